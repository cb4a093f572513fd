"""Checkpoint keys from a stage's spec (code, the values it runs with, inputs), skip reasons, and the cleaning rule."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import pytest
from helpers.tiny import REPO, tiny_params

from posttrain.errors import ParamsError
from posttrain.spec import stage_spec
from posttrain.training import checkpoints as checkpointing


def _code(root: Path) -> Path:
    (root / "lib" / "__pycache__").mkdir(parents=True)
    (root / "lib" / "a.py").write_text("x = 1\n")
    (root / "lib" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (root / "run.py").write_text("print()\n")
    return root


def _toy_spec(root: Path):
    """The sft spec of the tiny recipe, with the toy code of `root` as its code deps."""
    return dataclasses.replace(stage_spec(tiny_params(), root, "sft"), code_deps=("run.py", "lib"))


def test_key_covers_code_files_and_the_stage_params_only(tmp_path):
    root = _code(tmp_path)
    spec = _toy_spec(root)

    def key_now(**sft: object) -> str:
        parts = checkpointing.key_components(spec, tiny_params(sft=sft), {"device": "cpu"}, code_root=root)
        return checkpointing.key_of(parts)

    parts = checkpointing.key_components(spec, tiny_params(), {"device": "cpu"}, code_root=root)
    assert sorted(parts["code"]) == ["lib/a.py", "run.py"]  # no .pyc
    assert sorted(parts["params"]) == [
        "compute",
        "data.domains",
        "mixtures.sft",
        "model",
        "seed",
        "sft",
    ]
    key = key_now()
    assert checkpointing.key_of(parts) == key
    assert key_now(max_length=33) != key  # the stage's own section
    (root / "lib" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\1")
    assert key_now() == key
    (root / "lib" / "a.py").write_text("x = 1  # a comment\n")
    assert key_now() != key


def test_a_missing_code_dep_is_an_error_naming_it(tmp_path):
    root = _code(tmp_path)
    (root / "run.py").unlink()
    with pytest.raises(ParamsError, match="run.py"):
        checkpointing.code_hashes(root, ["run.py", "lib"])


def test_repository_trainer_stages_key_their_library_code():
    params = tiny_params()
    for stage in ("pretrain", "cpt", "sft", "dpo", "grpo"):
        files = checkpointing.code_hashes(REPO, list(stage_spec(params, REPO, stage).code_deps))
        assert f"stages/{stage}.py" in files and "posttrain/training/job.py" in files


def test_a_variant_retrains_after_its_stage_code_changes(tmp_path):
    """A variant (`sft@arith`) keys the code of its stage module: an edit of stages/sft.py must not resume
    the old code's complete checkpoint (its key had no code at all)."""
    params = tiny_params(
        variants={"sft": {"arith": {"trainer": {"max_steps": 2}}}},
        mixtures={"sft@arith": {"weights": {"add": 1.0}, "format": "prompt_completion"}},
    )
    code = tmp_path / "code"
    for folder in ("posttrain", "stages"):
        shutil.copytree(REPO / folder, code / folder, ignore=shutil.ignore_patterns("__pycache__"))
    spec = stage_spec(params, REPO, "sft@arith")
    assert "stages/sft.py" in spec.code_deps and spec.parents == ("cpt",)

    def key_now() -> str:
        return checkpointing.key_of(checkpointing.key_components(spec, params, {}, code_root=code))

    before = key_now()
    with (code / "stages" / "sft.py").open("a") as handle:
        handle.write("# changed\n")
    assert key_now() != before


def test_skipped_folders_are_logged_with_the_reason_and_old_keys_cleaned(tmp_path, caplog):
    root = _code(tmp_path / "code")
    spec = _toy_spec(root)
    params = tiny_params()
    checkpoints = tmp_path / "checkpoints"
    parts = checkpointing.key_components(spec, params, {"device": "cpu"}, code_root=root)
    first = checkpoints / f"sft-{checkpointing.key_of(parts)}"
    checkpointing.prepare_folder(first, parts, clean=True)
    legacy = checkpoints / "sft-0123456789abcdef"  # an older scheme: no key.json
    legacy.mkdir()
    other = checkpoints / "cpt-aaaa"
    other.mkdir()
    os.utime(legacy, (1, 1))  # oldest

    (root / "lib" / "a.py").write_text("x = 2\n")
    parts2 = checkpointing.key_components(spec, params, {"device": "cpu"}, code_root=root)
    second = checkpoints / f"sft-{checkpointing.key_of(parts2)}"
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
