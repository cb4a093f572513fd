"""Resume is exact and belongs to one set of inputs (real pretrain stage, tiny settings, subprocesses).

The project under test carries its own copy of posttrain/ and stages/ and a dvc.yaml whose
`pretrain` deps list them, as the repository's does, so editing a comment in its code is what a
user's edit is. One complete run is the reference; each test reruns the stage in that project:

- rerun after a complete run (what `dvc repro -f -s pretrain` does): resumes the final checkpoint,
  trains 0 steps, writes a model with the same content hash;
- the final checkpoint complete but no model written (a kill between the two): same;
- tracking fails after training (an MLflow store that is no database): exit 1, then a rerun trains nothing;
- a comment added to a library module: the key changes, the old folder is skipped with the reason
  in the log, training starts at step 0 (and, the maths being unchanged, ends at the same hash).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.projects import DPO_GRPO, TRAINING, build_trained_input_project, make_project
from helpers.tiny import REPO, tiny_raw

from posttrain.config import parse_params

pytestmark = pytest.mark.slow

STEPS = 12
SAVE = 6
DVC_YAML = {
    "stages": {
        "pretrain": {
            "cmd": "python -m stages.pretrain",
            "deps": ["stages/pretrain.py", "posttrain", "artifacts/data/prepared", "artifacts/data/mixtures/pretrain"],
            "params": ["seed", "compute", "model", "mixtures.pretrain", "pretrain"],
            "outs": ["artifacts/models/pretrain"],
        }
    }
}


def _run(root: Path, expect: int = 0) -> str:
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.pretrain", "--root", str(root)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-4000:]
    return out


def _metrics(root: Path) -> dict:
    return json.loads((root / "artifacts" / "metrics" / "pretrain.json").read_text())


def _key_folders(root: Path) -> list[Path]:
    return sorted((root / "checkpoints").glob("pretrain-*"))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A finished pretrain run; tests rerun in this project in file order (each leaves it finished)."""
    root = tmp_path_factory.mktemp("exact")
    raw = tiny_raw(TRAINING, pretrain={"trainer": {"max_steps": STEPS, "save_steps": SAVE}, "eval_every": SAVE})
    make_project(root, raw)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "posttrain", root / "posttrain", ignore=ignore)
    shutil.copytree(REPO / "stages", root / "stages", ignore=ignore)
    _run(root)
    metrics = _metrics(root)
    assert metrics["steps"] == STEPS and metrics["steps_this_run"] == STEPS
    # The machine is named in the metrics: CPU numerics differ between CPU models.
    assert metrics["environment"]["cpu"] and "torch" in metrics["environment"]["libraries"]
    return root


def test_rerun_after_complete_run_trains_zero_steps_same_hash(project):
    reference = _metrics(project)["content_hash"]
    out = _run(project)
    assert f"(step {STEPS})" in out and "resuming from" in out
    metrics = _metrics(project)
    assert metrics["steps"] == STEPS  # was STEPS + 1: the Trainer took one step past max_steps
    assert metrics["steps_this_run"] == 0
    assert metrics["resumed_from_step"] == STEPS
    assert metrics["content_hash"] == reference


def test_kill_between_final_checkpoint_and_model_write_reruns_to_same_hash(project):
    reference = _metrics(project)["content_hash"]
    # What a kill after the final checkpoint's COMPLETE marker and before the model write leaves.
    (final_checkpoint,) = _key_folders(project)[0].glob(f"checkpoint-{STEPS}/COMPLETE")
    shutil.rmtree(project / "artifacts" / "models" / "pretrain")
    (project / "artifacts" / "metrics" / "pretrain.json").unlink()
    assert final_checkpoint.is_file()
    _run(project)
    metrics = _metrics(project)
    assert metrics["steps_this_run"] == 0
    assert metrics["content_hash"] == reference


def test_tracking_failure_after_training_then_rerun_trains_nothing(project):
    reference = _metrics(project)["content_hash"]
    params_path = project / "params.yaml"
    original = params_path.read_text()
    raw = yaml.safe_load(original)
    # A store that passes the writability probe at the stage's start but is no SQLite database:
    # MLflow fails only when the stage records its run, after training and the model write.
    store = project / "broken-store"
    store.mkdir(exist_ok=True)
    (store / "mlflow.db").write_bytes(b"not a database, " * 64)
    raw["tracking"] = {**raw["tracking"], "enabled": True, "tracking_uri": f"sqlite:///{store}/mlflow.db"}
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        out = _run(project, expect=1)
        # Training and the model write finished; recording in MLflow is what failed.
        assert "pretrain: model written to" in out and "stage pretrain: finished" in out
        after = out.rsplit("stage pretrain: finished", 1)[1]
        # One error line that names the cause and the way out, not the store's traceback.
        assert "error: stage pretrain: recording the run in MLflow failed" in after
        assert "file is not a database" in after and "rerun the stage" in after
        assert "Traceback" not in after
    finally:
        params_path.write_text(original)  # tracking params are not in the stage's key
    _run(project)
    metrics = _metrics(project)
    assert metrics["steps_this_run"] == 0
    assert metrics["content_hash"] == reference


def test_code_comment_changes_key_and_training_starts_from_step_zero(project):
    reference = _metrics(project)["content_hash"]
    (old_folder,) = _key_folders(project)
    with (project / "posttrain" / "models" / "lora.py").open("a") as handle:
        handle.write("# a comment: the code changed, so its checkpoints belong to another run\n")
    out = _run(project)
    assert (
        f"checkpoint folder {old_folder} skipped, made from other inputs: code posttrain/models/lora.py changed" in out
    )
    assert "resuming from" not in out
    metrics = _metrics(project)
    assert metrics["resumed_from_step"] is None
    assert metrics["steps_this_run"] == STEPS
    # A comment does not change the maths: same seed, same machine, same weights.
    assert metrics["content_hash"] == reference
    # The cleaning rule keeps both keys (KEEP_KEYS = 2), the new one with its key.json.
    folders = _key_folders(project)
    assert len(folders) == 2 and old_folder in folders
    new = next(f for f in folders if f != old_folder)
    assert "posttrain/models/lora.py" in json.loads((new / "key.json").read_text())["code"]


@pytest.mark.parametrize(("stage", "input_stage"), [("sft", "cpt"), ("grpo", "dpo")])
def test_sft_and_grpo_rerun_after_complete_run_trains_zero_steps_same_hash(tmp_path, stage, input_stage):
    """The fix sits in the trainer class every stage shares; SFT and GRPO (sampled rollouts) show it too."""
    raw = tiny_raw(DPO_GRPO)
    raw[stage]["trainer"] = {"max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 2}
    raw[stage]["eval_items"] = 8
    raw[stage]["eval_every"] = 0
    build_trained_input_project(parse_params(raw), tmp_path, input_stage)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.pop("MLFLOW_TRACKING_URI", None)

    def run() -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}", "--root", str(tmp_path)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return json.loads((tmp_path / "artifacts" / "metrics" / f"{stage}.json").read_text())

    first = run()
    second = run()
    assert first["steps"] == second["steps"] == 4
    assert (second["steps_this_run"], second["resumed_from_step"]) == (0, 4)
    assert second["content_hash"] == first["content_hash"]
