"""User sources: files (JSONL, CSV, Parquet) and `datasets` folders; bad input names file, line and field."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.config import FileDomain, HubDomain
from posttrain.data.sources import load_file, load_hub
from posttrain.errors import DataError


def file_domain(path: Path, **kw) -> FileDomain:
    return FileDomain(kind="file", path=str(path), **kw)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def error(path_or_config, tmp_path: Path) -> str:
    config = path_or_config if isinstance(path_or_config, FileDomain) else file_domain(path_or_config)
    with pytest.raises(DataError) as info:
        load_file("qa", config, tmp_path, "exact")
    return str(info.value)


# --------------------------------------------------------------------------- good input


def test_jsonl_verifiable_with_column_mapping(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "qa.jsonl", [{"q": "2+2=", "a": "4"}, {"q": "3+3=", "a": "6"}, {"q": "2+2=", "a": "4"}]
    )
    records, report = load_file("qa", file_domain(path, columns={"prompt": "q", "answer": "a"}), tmp_path, "exact")
    assert [(r["prompt"], r["answer"], r["text"], r["verifier"]) for r in records] == [
        ("2+2=", "4", "2+2=4", "exact"),
        ("3+3=", "6", "3+3=6", "exact"),
    ]
    assert report.duplicates == 1 and report.mode == "prompt_answer"


def test_relative_path_and_text_only_csv(tmp_path: Path) -> None:
    (tmp_path / "docs.csv").write_text('text,source\n"a document, with a comma",x\nsecond doc,y\n')
    records, report = load_file("docs", file_domain(Path("docs.csv")), tmp_path, "exact")
    assert [r["text"] for r in records] == ["a document, with a comma", "second doc"]
    assert all(r["prompt"] == r["answer"] == r["verifier"] == "" for r in records) and report.mode == "text"


def test_parquet_auto_detects_prompt_answer(tmp_path: Path) -> None:
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "1+2="], "answer": ["2", "3"], "extra": [1, 2]}), path)
    records, _ = load_file("qa", file_domain(path), tmp_path, "numeric")
    assert [(r["prompt"], r["answer"], r["verifier"]) for r in records] == [
        ("1+1=", "2", "numeric"),
        ("1+2=", "3", "numeric"),
    ]


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    message = error(tmp_path / "nope.jsonl", tmp_path)
    assert "nope.jsonl: file not found" in message and "data.domains.qa.path" in message


def test_unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("x\n")
    assert "cannot tell the format from suffix '.txt'" in error(tmp_path / "data.txt", tmp_path)


def test_csv_missing_column(tmp_path: Path) -> None:
    (tmp_path / "qa.csv").write_text("question,answer\n1+1=,2\n")
    message = error(file_domain(tmp_path / "qa.csv", columns={"prompt": "prompt"}), tmp_path)
    assert (
        "qa.csv" in message
        and "missing column 'prompt' for field 'prompt'" in message
        and "['question', 'answer']" in message
    )


def test_csv_empty_cell_names_row_and_line(tmp_path: Path) -> None:
    (tmp_path / "qa.csv").write_text("prompt,answer\n1+1=,2\n1+2=,\n")
    message = error(tmp_path / "qa.csv", tmp_path)
    assert "qa.csv: row 2 (line 3): field 'answer' (column 'answer') is an empty string" in message


def test_jsonl_missing_field_names_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+2=", "answer": "3"}, {"prompt": "1+3="}],
    )
    assert "qa.jsonl: line 3: field 'answer' (column 'answer') is missing" in error(path, tmp_path)


def test_jsonl_non_string_value(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "1+1=", "answer": 2}])
    message = error(path, tmp_path)
    assert "qa.jsonl: line 1: field 'answer'" in message and "int 2" in message and "expected a string" in message


def test_jsonl_null_and_blank_values(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": None, "answer": "3"}])
    assert "line 2: field 'prompt' (column 'prompt') is empty (null)" in error(path, tmp_path)
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "   ", "answer": "3"}])
    assert "line 1: field 'prompt' (column 'prompt') is an empty string" in error(path, tmp_path)


def test_jsonl_invalid_json_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "1+1=", "answer": "2"}, "", '{"prompt": "1+2=", "answer": 3'])
    message = error(path, tmp_path)
    assert "qa.jsonl: line 3: invalid JSON" in message  # blank line 2 is skipped but still counted


def test_jsonl_undecodable_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\xe9=", "answer": "x"}\n')
    assert "qa.jsonl: line 2: not valid UTF-8" in error(path, tmp_path)


def test_csv_undecodable_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_bytes(b"prompt,answer\n1+1=,2\n1+2=,\xff\n")
    assert "qa.csv: line 3: not valid UTF-8" in error(path, tmp_path)


def test_parquet_null_names_row(tmp_path: Path) -> None:
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "1+2="], "answer": ["2", None]}), path)
    assert "qa.parquet: row 2: field 'answer' (column 'answer') is empty (null)" in error(path, tmp_path)


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "qa.jsonl").write_text("\n\n")
    message = error(file_domain(tmp_path / "qa.jsonl", columns={"prompt": "q", "answer": "a"}), tmp_path)
    assert "qa.jsonl: the file is empty" in message


def test_no_usable_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1=", "solution": "2"}])
    message = error(path, tmp_path)
    assert "found no known format in columns ['question', 'solution']" in message
    assert "prompt+answer" in message and "messages" in message


def test_skip_bad_rows_counts_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_bytes(
        b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "1+2="}\nnot json\n\xff\xfe\n'
        b'{"prompt": "1+3=", "answer": 4}\n{"prompt": "1+4=", "answer": "5"}\n'
    )
    with caplog.at_level(logging.WARNING, logger="posttrain.data"):
        records, report = load_file("qa", file_domain(path, skip_bad_rows=True), tmp_path, "exact")
    assert [r["prompt"] for r in records] == ["1+1=", "1+4="]
    assert report.skipped == 4 and report.rows == 6
    assert "skipped 4 bad row(s)" in caplog.text and "line 2" in caplog.text


def test_skip_bad_rows_everything_bad_is_still_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "1+1="}, "oops", {"prompt": "1+2=", "answer": 3}])
    message = error(file_domain(path, skip_bad_rows=True), tmp_path)
    assert "no usable rows (3 bad row(s) skipped)" in message


# --------------------------------------------------------------------------- hub (local folders only: no network)


@pytest.fixture
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"question": f"{i}+1=", "solution": str(i + 1)} for i in range(5)])
    return folder


def test_hub_local_folder_through_load_dataset(local_hub: Path) -> None:
    config = HubDomain(
        kind="hub", name=str(local_hub), columns={"prompt": "question", "answer": "solution"}, max_items=3
    )
    records, report = load_hub("hubqa", config, "exact")
    assert [(r["prompt"], r["answer"]) for r in records] == [("0+1=", "1"), ("1+1=", "2"), ("2+1=", "3")]
    assert report.rows == 3


def test_hub_errors_name_the_dataset(local_hub: Path, tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"dataset '.*missing' split 'train' \(data.domains.hubqa\): could not be loaded"
    ):
        load_hub("hubqa", HubDomain(kind="hub", name=str(tmp_path / "missing")), "exact")
    with pytest.raises(
        DataError, match=r"maps \['prompt'\] but no format is complete \(.*prompt_answer also needs \['answer'\]"
    ):
        load_hub("hubqa", HubDomain(kind="hub", name=str(local_hub), columns={"prompt": "question"}), "exact")
