"""Kill-and-resume, for real: a training stage in a subprocess is killed (SIGKILL) or preempted
(SIGTERM) after a checkpoint is complete; the rerun resumes from the newest COMPLETE checkpoint,
skips a half-written one, and ends with the same weights as an uninterrupted run with the same seed.

Tolerance: CPU training with the same seed is bit-identical here, and the Trainer restores model,
optimizer, scheduler, RNG state and data position from the checkpoint, so we require the final
weights to agree to 1e-6 (absolute) and the final logged loss to 1e-5.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.projects import TRAINING, make_project
from helpers.tiny import REPO, tiny_raw

pytestmark = pytest.mark.slow

STEPS = 120
SAVE = 20


def _project(root: Path) -> Path:
    raw = tiny_raw(
        TRAINING, pretrain={"trainer": {"max_steps": STEPS, "save_steps": SAVE, "logging_steps": 10}, "eval_every": 40}
    )
    make_project(root, raw)
    return root


def _start(root: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "stages.pretrain", "--root", str(root)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _run(root: Path) -> str:
    proc = _start(root)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _wait_for_complete_checkpoint(root: Path, proc: subprocess.Popen, step: int) -> Path:
    deadline = time.time() + 300
    while time.time() < deadline:
        found = list((root / "checkpoints").glob(f"pretrain-*/checkpoint-{step}/COMPLETE"))
        if found:
            return found[0].parent
        assert proc.poll() is None, "the stage ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("no complete checkpoint appeared")


def _weights(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(root / "artifacts" / "models" / "pretrain" / "model.safetensors")


def _metrics(root: Path) -> dict:
    return json.loads((root / "artifacts" / "metrics" / "pretrain.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    root = _project(tmp_path_factory.mktemp("reference"))
    _run(root)
    return root


def _assert_same_result(root: Path, reference: Path) -> None:
    import torch

    ours, theirs = _weights(root), _weights(reference)
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"
    assert all(torch.isfinite(t).all() for t in ours.values())
    m, ref = _metrics(root), _metrics(reference)
    assert m["steps"] == ref["steps"] == STEPS
    assert m["final_train_loss"] == pytest.approx(ref["final_train_loss"], abs=1e-5)
    # The continual-eval points recorded before the kill survive the resume.
    assert sorted({r["step"] for r in m["continual_eval"]}) == [0, 40, 80, 120]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, reference):
    root = _project(tmp_path / "killed")
    proc = _start(root)
    checkpoint = _wait_for_complete_checkpoint(root, proc, 2 * SAVE)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (root / "artifacts" / "models" / "pretrain").exists()

    # The newest complete checkpoint, and a newer half-written one (no COMPLETE marker).
    complete = sorted(
        (int(p.parent.name.split("-")[1]), p.parent) for p in checkpoint.parent.glob("checkpoint-*/COMPLETE")
    )[-1]
    half = checkpoint.parent / f"checkpoint-{STEPS - SAVE}"
    half.mkdir(exist_ok=True)
    (half / "trainer_state.json").write_text("{")  # cut off mid-save

    out = _run(root)
    assert f"resuming from {complete[1]} (step {complete[0]})" in out
    assert f"checkpoint {half} has no COMPLETE marker" in out
    metrics = _metrics(root)
    assert metrics["resumed_from_step"] == complete[0]
    assert metrics["steps_this_run"] == STEPS - complete[0]
    _assert_same_result(root, reference)


def test_sigterm_saves_checkpoint_exits_nonzero_and_resumes(tmp_path, reference):
    root = _project(tmp_path / "preempted")
    proc = _start(root)
    _wait_for_complete_checkpoint(root, proc, SAVE)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]
    assert "stopped by SIGTERM at step" in out
    stopped_at = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert list((root / "checkpoints").glob(f"pretrain-*/checkpoint-{stopped_at}/COMPLETE"))
    assert not (root / "artifacts" / "models" / "pretrain").exists()

    out = _run(root)
    assert f"(step {stopped_at})" in out
    assert _metrics(root)["resumed_from_step"] == stopped_at
    _assert_same_result(root, reference)
