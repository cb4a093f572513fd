"""Hostile inputs (cases 4-12 of docs/reliability.md) refused early with one line naming the input, or handled.

Cases 1-3 (stale data, promotion after a run-cache restore, params edited mid-stage) are end to
end in tests/test_hostile_e2e.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.tiny import REPO
from typer.testing import CliRunner

from posttrain.config import TrainerArgs, parse_params, read_yaml
from posttrain.data import userdeps
from posttrain.errors import DataError, ParamsError
from posttrain.layout import Layout
from posttrain.pipeline import preflight
from posttrain.pipeline.cli import app

runner = CliRunner()


def refused(raw: dict[str, Any], *expected: str) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    message = str(info.value)
    for text in expected:
        assert text in message, message
    return message


# --------------------------------------------------------------------------- 4: YAML 1.1 e-notation


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-8", 1e-8), ("1E-8", 1e-8), ("5e-4", 5e-4), ("-1e+3", -1e3), ("1.5e-3", 1.5e-3), (".5e-2", 0.005)],
)
def test_e_notation_in_trainer_mappings_is_a_number(tiny_params: dict[str, Any], text: str, value: float) -> None:
    # PyYAML (YAML 1.1) gives '1e-8' as a string; TRL would fail on it after upstream stages ran.
    tiny_params["sft"]["trainer"] = yaml.safe_load(f"{{adam_epsilon: {text}, learning_rate: {text.lstrip('-')}}}")
    trainer = parse_params(tiny_params).sft.trainer.model_dump()
    assert trainer["adam_epsilon"] == pytest.approx(value) and isinstance(trainer["adam_epsilon"], float)
    assert trainer["learning_rate"] == pytest.approx(abs(value))


def test_other_trainer_strings_stay_strings() -> None:
    assert TrainerArgs.model_validate({"optim": "adamw_torch", "run_name": "e5"}).model_dump()["optim"] == "adamw_torch"


# --------------------------------------------------------------------------- 5: empty val/test splits


def test_prepare_refuses_an_empty_split_naming_domain_and_split(tmp_path: Path, tiny_params: dict[str, Any]) -> None:
    from stages import prepare

    tiny_params["data"]["split"]["val_fraction"] = 0.0001
    with pytest.raises(DataError, match=r"domain add: val split is empty \(300 items in all, data.split.val_fraction"):
        prepare.run(parse_params(tiny_params), Layout(tmp_path))
    assert not (tmp_path / "artifacts" / "data" / "prepared").exists()


# --------------------------------------------------------------------------- 6: domain names


@pytest.mark.parametrize("name", ["../../../escape", "add (2 digits)", "a/b", "", "-x", "x" * 65])
def test_unsafe_domain_names_are_refused(tiny_params: dict[str, Any], name: str) -> None:
    tiny_params["data"]["domains"][name] = {"kind": "addition"}
    refused(tiny_params, f"domain name data.domains.{name}: got {name!r}; expected letters, digits")


def test_continual_domain_name_is_checked_too(tiny_params: dict[str, Any]) -> None:
    tiny_params.setdefault("orchestration", {})["continual"] = {"domain": "../up"}
    refused(tiny_params, "orchestration.continual.domain", "'../up'")


# --------------------------------------------------------------------------- 7: long strings


def test_redaction_is_linear_on_a_10_mb_value() -> None:
    from posttrain.io import redact

    started = time.perf_counter()
    assert redact({"salt": "a" * 10_000_000})["salt"] == "a" * 10_000_000
    assert redact("x://" + "b" * 5_000_000)[:4] == "x://"
    assert time.perf_counter() - started < 10  # the old regex never returned (10+ minutes)
    assert redact("mlflow https://bob:pw@host/x and s3://u:p@b/k, http://plain@h") == (
        "mlflow https://bob:***@host/x and s3://u:***@b/k, http://plain@h"
    )


def test_logged_param_values_are_bounded() -> None:
    from posttrain.tracking.runs import _param_value

    assert len(_param_value("s" * 10_000_000)) == 6000


# --------------------------------------------------------------------------- 8: tracking


@pytest.mark.parametrize(("key", "value"), [("registered_model_prefix", "team/llm"), ("experiment", "")])
def test_tracking_names_are_validated(tiny_params: dict[str, Any], key: str, value: str) -> None:
    tiny_params["tracking"][key] = value
    refused(tiny_params, f"tracking.{key}: got {value!r}")


def test_unwritable_store_fails_before_training(tmp_path: Path, tiny_params: dict[str, Any], monkeypatch) -> None:
    from posttrain.errors import TrackingError
    from posttrain.tracking.client import check_tracking_server

    blocker = tmp_path / "file"
    blocker.write_text("")
    tiny_params["tracking"] |= {"enabled": True, "tracking_uri": f"sqlite:///{blocker}/mlflow.db"}
    with pytest.raises(TrackingError, match=r"is not writable"):
        check_tracking_server(parse_params(tiny_params), tmp_path)
    # A read-only mlflow.db (root ignores file modes, so the check is what is simulated here).
    db = tmp_path / "mlflow.db"
    db.write_text("")
    tiny_params["tracking"]["tracking_uri"] = f"sqlite:///{db}"
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path).name == "mlflow.db" else real(path, mode))
    with pytest.raises(TrackingError, match=r"mlflow.db is not writable"):
        check_tracking_server(parse_params(tiny_params), tmp_path)


# --------------------------------------------------------------------------- 9: cross-references


CROSS_REFERENCES = [
    ({"promotion": {"compare_domain": "nosuch"}}, "promotion.compare_domain: got 'nosuch', expected a domain in"),
    (
        {"promotion": {"final_stage": "dpo"}, "evaluate": {"models": ["sft", "merge"]}, "tracking": {"enabled": True}},
        "promotion.final_stage: got 'dpo', expected a stage in evaluate.models",
    ),
    ({"mixtures.cpt.replay": {"from_stage": "cpt"}}, "mixtures.cpt.replay.from_stage: got 'cpt', expected an earlier"),
    (
        {"mixtures.pretrain.replay": {"from_stage": "sft"}},
        "mixtures.pretrain.replay.from_stage: got 'sft', expected no replay",
    ),
    ({"merge": {"models": ["grpo", "grpo"], "weights": [1, 1]}}, "merge.models[1]: got 'grpo', expected each stage"),
    ({"evaluate": {"models": ["sft", "sft", "merge"]}}, "evaluate.models[1]: got 'sft', expected each stage"),
    ({"mixtures.sft.format": "text"}, "mixtures.sft.format: got 'text', expected 'prompt_completion'"),
]


@pytest.mark.parametrize(("change", "message"), CROSS_REFERENCES)
def test_cross_references_are_refused(tiny_params: dict[str, Any], change: dict[str, Any], message: str) -> None:
    raw = copy.deepcopy(tiny_params)
    for path, value in change.items():
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node[part]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = {**node[last], **value}
        else:
            node[last] = value
    refused(raw, message)


def test_duplicate_key_in_params_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\ndata:\n  seed: 0\nseed: 2\n")
    with pytest.raises(ParamsError, match=r"line 4, column 1: duplicate key 'seed'"):
        read_yaml(path)


def test_invalid_cron_is_refused_by_validate(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    assert preflight.cron_problem("0 2 * * *") is None
    assert "orchestration.continual.cron: got '61 2 * * *'" in preflight.cron_problem("61 2 * * *")
    tiny_params["orchestration"] = {"continual": {"cron": "every day"}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params))
    result = runner.invoke(app, ["validate", str(path), "--root", str(tmp_path)])
    assert result.exit_code == 1 and "orchestration.continual.cron: got 'every day'" in result.output


def test_vocab_size_below_the_alphabet(tiny_params: dict[str, Any]) -> None:
    tiny_params["model"]["tokenizer"]["vocab_size"] = 32
    problem = preflight.vocab_problem(parse_params(tiny_params))
    assert problem and problem.startswith("model.tokenizer.vocab_size: got 32") and "expected at least" in problem
    tiny_params["model"]["tokenizer"]["vocab_size"] = 96
    assert preflight.vocab_problem(parse_params(tiny_params)) is None


def test_tokenizer_training_refuses_a_vocab_it_cannot_keep() -> None:
    from posttrain.config import TokenizerConfig
    from posttrain.errors import StageError
    from posttrain.models.build import train_tokenizer

    texts = ["".join(chr(c) for c in range(0x3B1, 0x3B1 + 25)) + "abcdefghijklmnopqrstuvwxyz"] * 3
    with pytest.raises(StageError, match=r"model.tokenizer.vocab_size: got 32, but the training texts need"):
        train_tokenizer(texts, TokenizerConfig(vocab_size=32))


# --------------------------------------------------------------------------- 10: one line, not a traceback


@pytest.mark.parametrize("seed", [-1, 2**70])
def test_seed_out_of_range(tiny_params: dict[str, Any], seed: int) -> None:
    tiny_params["seed"] = seed
    refused(tiny_params, "seed: Input should be")


def test_truncation_that_leaves_no_completion_is_refused() -> None:
    from posttrain.config import TokenizerConfig
    from posttrain.models.build import train_tokenizer
    from posttrain.training.inputs import check_completion_room

    tokenizer = train_tokenizer([f"{a}+{b}={a + b}" for a in range(30) for b in range(30)], TokenizerConfig())
    prompts = ["12+34=", "1+2="]
    with pytest.raises(DataError, match=r"sft.max_length: got 3 with on_too_long: truncate, which leaves no"):
        check_completion_room(prompts, tokenizer, 3, "sft", "mix.parquet")
    check_completion_room(prompts, tokenizer, 6, "sft", "mix.parquet")  # '1+2=' leaves room


def test_non_utf8_params_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 1\n# caf\xe9\n")
    result = runner.invoke(app, ["validate", str(path), "--root", str(tmp_path)])
    assert result.exit_code == 1
    assert (
        result.output.strip() == f"error: {path}: line 2: byte 0xe9 is not valid UTF-8; expected a UTF-8 encoded file"
    )


def test_bad_yaml_in_set_is_one_line(tmp_path: Path) -> None:
    from posttrain.config import set_override

    with pytest.raises(ParamsError, match=r"override 'seed=\[': the value is not valid YAML"):
        set_override({}, "seed=[")


def test_promote_a_version_that_does_not_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers.tracking import make_model, make_params, make_project, record, write_stage_metrics

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    layout, params = make_project(tmp_path), make_params(tmp_path)
    make_model(layout, "merge", seed=1)
    write_stage_metrics(layout, "merge")
    record("merge", params, layout)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    result = runner.invoke(app, ["promote", "--version", "999", "--root", str(tmp_path)])
    assert result.exit_code == 1
    # One line for the error (beside the line naming the candidate), no traceback.
    assert "error: --version 999: 'posttrain' has no such version; it has versions ['1']" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- 11: run --set writes nothing it refuses


@pytest.fixture
def small_project(tmp_path: Path, tiny_params: dict[str, Any]) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    repo = REPO
    (root / "dvc.yaml").write_text((repo / "dvc.yaml").read_text())
    (root / ".dvc").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "seed=5", "--stages", "nosuch"], "stage 'nosuch' is not in dvc.yaml"),
        (["--set", "sft.trainer.learnin_rate=1e-4"], "sft.trainer.learnin_rate: unknown setting for TRL's SFTConfig"),
        (["--set", "seed=["], "override 'seed=[': the value is not valid YAML"),
        (["--set", "seed=-1"], "seed: Input should be greater than or equal to 0"),
        (["--set", "orchestration.continual.cron=bad"], "orchestration.continual.cron: got 'bad'"),
    ],
)
def test_run_set_refuses_before_writing(small_project: Path, args: list[str], message: str) -> None:
    before = (small_project / "params.yaml").read_bytes()
    result = runner.invoke(app, ["run", *args, "--no-prefect", "--root", str(small_project)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert (small_project / "params.yaml").read_bytes() == before


# --------------------------------------------------------------------------- 12: messages that say what is wrong


def _file_domain_error(tmp_path: Path, path: Path) -> str:
    from posttrain.config import FileDomain
    from posttrain.data.sources import load_file

    with pytest.raises(DataError) as info:
        load_file("qa", FileDomain(kind="file", path=str(path), format="jsonl"), tmp_path, "exact")
    return str(info.value)


def test_data_path_that_is_a_directory_or_a_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    assert "folder: is a directory; expected a data file" in _file_domain_error(tmp_path, tmp_path / "folder")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert "a: is a symlink loop" in _file_domain_error(tmp_path, tmp_path / "a")
    assert "missing.jsonl: file not found" in _file_domain_error(tmp_path, tmp_path / "missing.jsonl")


def test_json_array_file_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"prompt": "1+1=", "answer": "2"}], indent=1))
    message = _file_domain_error(tmp_path, path)
    assert "qa.json: holds a JSON array; expected JSON Lines" in message and "jq -c" in message


def test_corrupt_dvc_lock_is_named(tmp_path: Path) -> None:
    from posttrain.pipeline import dag

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(dag.dvc_command("init", "-q"), cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: echo hi > o\n    outs: [o]\n")
    (tmp_path / "dvc.lock").write_text('schema: "2.0"\nstages: [\n')
    with pytest.raises(dag.DagError) as info:
        dag.pipeline_status(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'dvc.lock'}: ") and "dvc.yaml is fine" in str(info.value)


# --------------------------------------------------------------------------- 1 (unit level): hub datasets


def test_hub_id_needs_a_revision_and_a_local_folder_is_a_dependency(
    tmp_path: Path, tiny_params: dict[str, Any]
) -> None:
    from posttrain.spec import stage_spec

    tiny_params["data"]["domains"]["hubqa"] = {"kind": "hub", "name": "someone/qa"}
    (tmp_path / "local").mkdir()
    tiny_params["data"]["domains"]["localqa"] = {"kind": "hub", "name": "local"}
    params = parse_params(tiny_params)
    assert userdeps.problems(params.data, tmp_path) == [
        "data.domains.hubqa.revision: not set; a hub dataset can change without DVC seeing it. Pin a commit or tag, "
        "e.g. revision: <commit sha>"
    ]
    assert "local" in stage_spec(params, tmp_path, "prepare").data_deps  # a local folder is a dep of prepare
    tiny_params["data"]["domains"]["hubqa"]["revision"] = "3f1c2a"
    assert userdeps.problems(parse_params(tiny_params).data, tmp_path) == []
