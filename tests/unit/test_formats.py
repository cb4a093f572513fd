"""TRL's standard data formats from user files: each format read into records, each bad input refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from posttrain.config import AdditionDomain, FileDomain, MixtureConfig
from posttrain.data.decontamination import decontaminate
from posttrain.data.domains import generate, make_record, record_id
from posttrain.data.formats import decode_messages, trl_row
from posttrain.data.mixing import build_mixture
from posttrain.data.sources import load_file
from posttrain.data.splits import split_records
from posttrain.errors import DataError


def U(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def A(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def load(tmp_path: Path, rows: list, name: str = "data.jsonl", **kw):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, report = load_file("d", FileDomain(kind="file", path=str(path), **kw), tmp_path, "exact")
    return records, report


def refused(tmp_path: Path, rows: list, **kw) -> str:
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError) as info:
        load(tmp_path, rows, **kw)
    # Nothing is written besides the input file itself.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*before, "data.jsonl"})
    return str(info.value)


# --------------------------------------------------------------------------- formats


def test_language_modelling(tmp_path: Path) -> None:
    (record,), report = load(tmp_path, [{"text": "a document"}])
    assert report.mode == "text" and record["text"] == "a document" and record["messages"] == ""


def test_prompt_completion_standard(tmp_path: Path) -> None:
    (record,), report = load(tmp_path, [{"prompt": "Say hi.", "completion": " Hi!"}])
    assert report.mode == "prompt_completion"
    assert (record["prompt"], record["completion"], record["answer"], record["verifier"]) == ("Say hi.", " Hi!", "", "")


def test_conversational_messages_with_column_mapping(tmp_path: Path) -> None:
    conversation = [{"role": "system", "content": "Be brief."}, U("2+2?"), A("4")]
    (record,), report = load(tmp_path, [{"chat": conversation}], columns={"messages": "chat"})
    assert report.mode == "conversational"
    assert decode_messages(record["messages"]) == conversation
    assert record["text"] == "system: Be brief.\nuser: 2+2?\nassistant: 4"
    # Canonical JSON: key order in the file does not change the stored value or the id.
    reordered = [{"content": m["content"], "role": m["role"]} for m in conversation]
    (other,), _ = load(tmp_path, [{"chat": reordered}], columns={"messages": "chat"})
    assert other["messages"] == record["messages"] and other["id"] == record["id"]


def test_conversational_prompt_completion(tmp_path: Path) -> None:
    (record,), report = load(tmp_path, [{"prompt": [U("Hi")], "completion": [A("Hello")]}])
    assert report.mode == "prompt_completion"
    assert decode_messages(record["messages"]) == [U("Hi")] and decode_messages(record["completion"]) == [A("Hello")]


def test_preference_standard_and_conversational(tmp_path: Path) -> None:
    (plain,), report = load(tmp_path, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    assert report.mode == "preference" and (plain["prompt"], plain["chosen"], plain["rejected"]) == ("1+1=", "2", "3")
    (chat,), _ = load(tmp_path, [{"prompt": [U("1+1?")], "chosen": [A("2")], "rejected": [A("3")]}])
    assert decode_messages(chat["messages"]) == [U("1+1?")]
    assert decode_messages(chat["chosen"]) == [A("2")] and decode_messages(chat["rejected"]) == [A("3")]


def test_preference_implicit_prompt_is_the_shared_turns(tmp_path: Path) -> None:
    (record,), report = load(tmp_path, [{"chosen": [U("1+1?"), A("2")], "rejected": [U("1+1?"), A("3")]}])
    assert report.mode == "implicit_preference"
    assert decode_messages(record["messages"]) == [U("1+1?")]
    assert decode_messages(record["chosen"]) == [A("2")] and decode_messages(record["rejected"]) == [A("3")]


def test_prompt_only_conversational_with_answer(tmp_path: Path) -> None:
    (record,), report = load(tmp_path, [{"prompt": [U("What is 2+2?")], "answer": "4"}])
    assert report.mode == "prompt_answer" and record["answer"] == "4" and record["verifier"] == "exact"
    assert decode_messages(record["messages"]) == [U("What is 2+2?")] and record["prompt"] == ""


def test_csv_messages_as_json_string(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text(
        'messages\n"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""yo""}]"\n'
    )
    (record,), _ = load_file("d", FileDomain(kind="file", path="c.csv"), tmp_path, "exact")
    assert decode_messages(record["messages"]) == [U("hi"), A("yo")]


def test_chat_rendering_of_a_builtin_domain() -> None:
    plain = generate("add", AdditionDomain(kind="addition", n_items=5), seed=1)
    chat = generate("add", AdditionDomain(kind="addition", n_items=5, chat=True), seed=1)
    for p, c in zip(plain, chat, strict=True):
        assert (c["prompt"], c["answer"]) == (p["prompt"], p["answer"])  # still verifiable
        assert decode_messages(c["messages"]) == [U(p["prompt"])]
        assert decode_messages(c["completion"]) == [A(p["answer"])]
        assert c["id"] != p["id"]  # a different item: its conversation is part of the content


def test_plain_record_ids_unchanged() -> None:
    # Ids (and so splits) of items without conversation fields are those of the original schema.
    record = make_record("add", prompt="1+2=", answer="3")
    original = hashlib.sha256(json.dumps(["add", "1+2=", "3", "1+2=3"]).encode()).hexdigest()[:16]
    assert record["id"] == record_id("add", "1+2=", "3", "1+2=3") == original


def test_conversations_split_and_decontaminate(tmp_path: Path) -> None:
    rows = [{"messages": [U(f"question number {i} about topic {i % 7}"), A(f"answer {i}")]} for i in range(200)]
    records, _ = load(tmp_path, rows)
    again, _ = load(tmp_path, rows)
    parts = split_records(records, "salt", 0.1, 0.1)
    assert parts == split_records(again, "salt", 0.1, 0.1) and all(parts.values())
    # A training conversation that repeats a test conversation's rendered text is found.
    victim = parts["test"][0]
    copy = make_record("web", text="user said: " + victim["text"])
    report = decontaminate(
        {"d": {"train": parts["train"] + [copy], "val": [], "test": [victim]}},
        ngram=8,
        max_overlap=0.5,
        max_leaked_fraction=1.0,
    )
    assert report["leaked"] >= 1


# --------------------------------------------------------------------------- refused input


def test_unknown_role(tmp_path: Path) -> None:
    message = refused(tmp_path, [{"messages": [U("a"), A("b")]}, {"messages": [{"role": "bot", "content": "x"}]}])
    assert "data.jsonl: line 2: field 'messages' (column 'messages') message 0: unknown role 'bot'" in message


@pytest.mark.parametrize(
    "content, said",
    [("", "content is empty"), ("  ", "content is empty"), (7, "content is int 7"), (None, "content is NoneType")],
)
def test_empty_or_non_string_content(tmp_path: Path, content, said: str) -> None:
    message = refused(tmp_path, [{"messages": [U("q"), {"role": "assistant", "content": content}]}])
    assert "line 1: field 'messages' (column 'messages') message 1 (assistant): " + said in message


def test_sft_conversation_must_end_with_assistant(tmp_path: Path) -> None:
    message = refused(tmp_path, [{"messages": [A("hello"), U("bye")]}])
    assert "line 1: field 'messages' (column 'messages'): the last turn is 'user'; expected 'assistant'" in message


def test_chosen_equal_to_rejected(tmp_path: Path) -> None:
    message = refused(tmp_path, [{"prompt": "p", "chosen": "same", "rejected": "same"}])
    assert "line 1: fields 'chosen'/'rejected' are equal" in message
    message = refused(tmp_path, [{"prompt": [U("p")], "chosen": [A("x")], "rejected": [A("x")]}])
    assert "line 1: fields 'chosen'/'rejected' are equal" in message


def test_preference_prompt_differs(tmp_path: Path) -> None:
    message = refused(tmp_path, [{"chosen": [U("1+1?"), A("2")], "rejected": [U("1+2?"), A("3")]}])
    assert "line 1: fields 'chosen'/'rejected': the prompt differs at turn 0" in message
    message = refused(tmp_path, [{"chosen": [U("1+1?"), A("2")], "rejected": [U("1+1?"), A("x"), U("y"), A("3")]}])
    assert "the prompt differs (1 vs 3 prompt turns)" in message


def test_mixed_string_and_messages(tmp_path: Path) -> None:
    message = refused(tmp_path, [{"prompt": "p", "chosen": [A("x")], "rejected": "y"}])
    assert "one is a string and one is messages" in message


def test_messages_not_a_list(tmp_path: Path) -> None:
    message = refused(tmp_path, [{"messages": {"role": "user", "content": "x"}}])
    assert (
        "field 'messages' (column 'messages') is dict {'role': 'user', 'content': 'x'}, expected a string (quote it in the file) or a list of messages"
        in message
    )


def test_empty_file_says_empty(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e.jsonl: the file is empty"):
        load_file("d", FileDomain(kind="file", path="e.jsonl", columns={"messages": "m"}), tmp_path, "exact")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match=r"e.csv: the file is empty"):
        load_file("d", FileDomain(kind="file", path="e.csv"), tmp_path, "exact")


def test_not_utf8_says_so(tmp_path: Path) -> None:
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"no readable line: .*latin.jsonl: line 1: not valid UTF-8"):
        load_file("d", FileDomain(kind="file", path="latin.jsonl", columns={"prompt": "q"}), tmp_path, "exact")


def test_unmapped_columns_are_named(tmp_path: Path) -> None:
    message = refused(tmp_path, [{"question": "q", "reply": "r"}])
    assert "found no known format in columns ['question', 'reply']" in message
    assert "set `columns:`" in message


# --------------------------------------------------------------------------- mixtures


def _mixture(fmt: str, weights: dict[str, float]) -> MixtureConfig:
    return MixtureConfig(weights=weights, total=6, format=fmt)


def test_mixtures_of_a_chat_domain() -> None:
    chat = {"add": generate("add", AdditionDomain(kind="addition", n_items=20, chat=True), seed=1)}
    sft = build_mixture("sft", _mixture("conversational", {"add": 1.0}), chat)
    assert sft.manifest["conversational"] and sft.columns == ("id", "domain", "messages")
    for row in sft.rows:
        user, assistant = decode_messages(row["messages"])
        assert user["role"] == "user" and assistant == A(str(eval(user["content"].rstrip("="))))
    dpo = build_mixture("dpo", _mixture("preference", {"add": 1.0}), chat)
    for row in dpo.rows:
        assert decode_messages(row["prompt"])[0]["role"] == "user"
        assert decode_messages(row["chosen"]) == [A(row["answer"])] and decode_messages(row["rejected"]) != [
            A(row["answer"])
        ]
    grpo = build_mixture("grpo", _mixture("prompt_answer", {"add": 1.0}), chat)
    assert all(decode_messages(r["prompt"])[0]["role"] == "user" and r["answer"] for r in grpo.rows)
    # What a trainer hands TRL: message lists, gold answer and verifier as plain strings.
    row = trl_row(grpo.rows[0], grpo.manifest["conversational"])
    assert row["prompt"] == [U(grpo.rows[0]["prompt"][len('[{"content":"') :].split('"')[0])]
    assert (row["answer"], row["verifier"]) == (grpo.rows[0]["answer"], "exact")
    plain = build_mixture(
        "grpo",
        _mixture("prompt_answer", {"add": 1.0}),
        {"add": generate("add", AdditionDomain(kind="addition", n_items=20), seed=1)},
    )
    assert not plain.manifest["conversational"] and trl_row(plain.rows[0], False) == plain.rows[0]


def test_user_preference_pairs_are_used_as_given(tmp_path: Path) -> None:
    rows = [{"prompt": [U(f"q{i}")], "chosen": [A(f"good {i}")], "rejected": [A(f"bad {i}")]} for i in range(6)]
    records, _ = load(tmp_path, rows)
    mix = build_mixture("dpo", _mixture("preference", {"d": 1.0}), {"d": records})
    for row in mix.rows:
        i = decode_messages(row["prompt"])[0]["content"][1:]
        assert decode_messages(row["chosen"]) == [A(f"good {i}")] and decode_messages(row["rejected"]) == [
            A(f"bad {i}")
        ]


def test_mixture_refuses_chat_and_plain_together() -> None:
    train = {
        "chat": generate("chat", AdditionDomain(kind="addition", n_items=10, chat=True), seed=1),
        "plain": generate("plain", AdditionDomain(kind="addition", n_items=10), seed=1),
    }
    with pytest.raises(
        DataError, match=r"mixes conversational domain\(s\) \['chat'\] with plain domain\(s\) \['plain'\]"
    ):
        build_mixture("sft", _mixture("prompt_completion", {"chat": 1.0, "plain": 1.0}), train)
    with pytest.raises(DataError, match=r"format 'conversational' needs conversational items.*\['plain'\]"):
        build_mixture("sft", _mixture("conversational", {"plain": 1.0}), train)


def test_parquet_nested_messages_with_unused_struct_keys(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A struct column gives every message every key; unused ones are null (as `datasets` writes them).
    conversation = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "yo", "name": None},
    ]
    pq.write_table(pa.Table.from_pylist([{"conversation": conversation}]), tmp_path / "c.parquet")
    domain = FileDomain(kind="file", path="c.parquet", columns={"messages": "conversation"})
    (record,), report = load_file("d", domain, tmp_path, "exact")
    assert report.mode == "conversational" and decode_messages(record["messages"]) == [U("hi"), A("yo")]
    conversation[0]["name"] = "alice"
    pq.write_table(pa.Table.from_pylist([{"conversation": conversation}]), tmp_path / "c.parquet")
    with pytest.raises(
        DataError,
        match=r"c.parquet: row 1: field 'messages' \(column 'conversation'\) message 0 has unknown key\(s\) \['name'\]",
    ):
        load_file("d", domain, tmp_path, "exact")


def test_hub_preference_pairs_through_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from posttrain.config import HubDomain
    from posttrain.data.sources import load_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "feedback"
    folder.mkdir()
    rows = [{"chosen": [U(f"q{i}"), A("good")], "rejected": [U(f"q{i}"), A("bad")]} for i in range(3)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, report = load_hub("pairs", HubDomain(kind="hub", name=str(folder)), "exact")
    assert report.mode == "implicit_preference" and len(records) == 3
    assert decode_messages(records[2]["messages"]) == [U("q2")] and decode_messages(records[2]["chosen"]) == [A("good")]
