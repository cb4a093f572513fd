"""Checkpoint keys from dvc.yaml's view of a stage, skip reasons, and the cleaning rule (no training)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml
from helpers.tiny import REPO

from posttrain.dvcfile import stage_params
from posttrain.errors import ParamsError
from posttrain.training import checkpoints as checkpointing


def _project(root: Path) -> Path:
    (root / "lib" / "__pycache__").mkdir(parents=True)
    (root / "lib" / "a.py").write_text("x = 1\n")
    (root / "lib" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (root / "run.py").write_text("print()\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "train": {"lr": 0.1, "steps": 5}, "other": 3}))
    stage = {"cmd": "python run.py", "deps": ["run.py", "lib", "artifacts/data/x"], "params": ["seed", "train.lr"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    return root


def test_key_covers_code_files_and_listed_params_only(tmp_path):
    root = _project(tmp_path)
    parts = checkpointing.key_components(root, "train", {"device": "cpu"})
    assert sorted(parts["code"]) == ["lib/a.py", "run.py"]  # no .pyc, no artifacts/ dep
    assert parts["params"] == {"seed": 1, "train.lr": 0.1}
    key = checkpointing.key_of(parts)

    def key_now() -> str:
        return checkpointing.key_of(checkpointing.key_components(root, "train", {"device": "cpu"}))

    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "train": {"lr": 0.1, "steps": 9}, "other": 4}))
    assert key_now() == key  # keys dvc.yaml does not list for the stage
    (root / "lib" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\1")
    assert key_now() == key
    (root / "lib" / "a.py").write_text("x = 1  # a comment\n")
    assert key_now() != key


def test_missing_param_or_dep_is_an_error_naming_it(tmp_path):
    root = _project(tmp_path)
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "train": {}}))
    with pytest.raises(ParamsError, match="'train.lr'"):
        stage_params(root, "train")
    (root / "run.py").unlink()
    with pytest.raises(ParamsError, match="'run.py'"):
        checkpointing.code_hashes(root, checkpointing.code_deps(root, "train"))


def test_repository_trainer_stages_key_their_library_code():
    for stage in ("pretrain", "cpt", "sft", "dpo", "grpo"):
        files = checkpointing.code_hashes(REPO, checkpointing.code_deps(REPO, stage))
        assert f"stages/{stage}.py" in files and "posttrain/training/job.py" in files


def test_skipped_folders_are_logged_with_the_reason_and_old_keys_cleaned(tmp_path, caplog):
    root = _project(tmp_path)
    checkpoints = root / "checkpoints"
    parts = checkpointing.key_components(root, "train", {"device": "cpu"})
    first = checkpoints / f"train-{checkpointing.key_of(parts)}"
    checkpointing.prepare_folder(first, parts, clean=True)
    legacy = checkpoints / "train-0123456789abcdef"  # an older scheme: no key.json
    legacy.mkdir()
    other = checkpoints / "sft-aaaa"
    other.mkdir()
    os.utime(legacy, (1, 1))  # oldest

    (root / "lib" / "a.py").write_text("x = 2\n")
    parts2 = checkpointing.key_components(root, "train", {"device": "cpu"})
    second = checkpoints / f"train-{checkpointing.key_of(parts2)}"
    with caplog.at_level(logging.INFO, logger="posttrain.training.checkpoints"):
        checkpointing.prepare_folder(second, parts2, clean=True)
    assert f"checkpoint folder {first} skipped, made from other inputs: code lib/a.py changed" in caplog.text
    assert f"checkpoint folder {legacy} skipped, made from other inputs: no readable key.json" in caplog.text
    # keep 2 per stage: the new key and the one before; the legacy folder goes; other stages untouched
    assert sorted(checkpoints.iterdir()) == sorted([first, second, other])

    assert checkpointing.clean(checkpoints, keep=1) == [first]
    assert checkpointing.clean(checkpoints, everything=True) == sorted([other, second])
    assert not checkpoints.exists()


def test_posttrain_clean_command(tmp_path):
    from typer.testing import CliRunner

    from posttrain.pipeline.cli import app

    checkpoints = tmp_path / "checkpoints"
    for i, name in enumerate(("sft-old", "sft-mid", "sft-new", "grpo-only")):
        (checkpoints / name).mkdir(parents=True)
        os.utime(checkpoints / name, (100 + i, 100 + i))
    result = CliRunner().invoke(app, ["clean", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"removed {checkpoints / 'sft-old'}" in result.output
    assert sorted(p.name for p in checkpoints.iterdir()) == ["grpo-only", "sft-mid", "sft-new"]
    result = CliRunner().invoke(app, ["clean", "--all", "--root", str(tmp_path)])
    assert result.exit_code == 0 and not checkpoints.exists()
    assert CliRunner().invoke(app, ["clean", "--root", str(tmp_path)]).output.strip() == "nothing to remove"
