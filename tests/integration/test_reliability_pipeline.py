"""Crash and resume at the pipeline level: `dvc repro` (and the stage under it) killed with SIGKILL
mid-training, then rerun.

Tolerance: CPU training with one seed is bit-identical here and the Trainer restores weights,
optimizer, scheduler, RNG and data position, so the resumed run must match an uninterrupted one to
1e-6 in every weight and 1e-5 in the final logged loss (the same bounds as tests/test_resume.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers.projects import make_project_copy, project_env, stages_run

pytestmark = pytest.mark.slow

STEPS, SAVE = 120, 20


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


class ModelsWatcher(threading.Thread):
    """Polls artifacts/models/ while the pipeline runs: every visible model folder must be finished
    (lineage.json is written last, inside the temporary folder, before the rename)."""

    def __init__(self, models: Path) -> None:
        super().__init__(daemon=True)
        self.models, self.stop, self.partial, self.looks = models, threading.Event(), [], 0

    def run(self) -> None:
        while not self.stop.is_set():
            if self.models.is_dir():
                for folder in self.models.iterdir():
                    if not folder.name.startswith(".") and not (folder / "lineage.json").is_file():
                        # A rename is atomic, so a visible folder without lineage is a partial output.
                        if folder.exists():
                            self.partial.append(folder.name)
                self.looks += 1
            time.sleep(0.01)


def test_sigkilled_dvc_repro_resumes_the_stage_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    root = make_project_copy(tmp_path / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["enabled"] = False  # MLflow is not what this test is about; ~3 s per stage saved
    params["compute"]["num_threads"] = 1
    params["cpt"]["trainer"].update(max_steps=STEPS, save_steps=SAVE, logging_steps=20)
    params["cpt"]["eval_every"] = 0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(root)
    watcher = ModelsWatcher(root / "artifacts" / "models")
    watcher.start()

    # 1. The pipeline up to cpt; the whole process group (dvc and the stage) dies once a checkpoint is complete.
    proc = subprocess.Popen(
        ["dvc", "repro", "cpt"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while not list((root / "checkpoints").glob(f"cpt-*/checkpoint-{2 * SAVE}/COMPLETE")):
        assert proc.poll() is None, "the pipeline ended before it could be killed:\n" + proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no complete cpt checkpoint appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    first_out = proc.communicate(timeout=60)[0]
    assert stages_run(first_out) == ["prepare", "mix", "pretrain", "cpt"], first_out[-3000:]
    assert not (root / "artifacts" / "models" / "cpt").exists()
    ckpt_dir = next((root / "checkpoints").glob("cpt-*"))
    complete = max(int(p.parent.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*/COMPLETE"))
    assert SAVE * 2 <= complete < STEPS

    # 2. Rerun: only cpt runs, from its newest complete checkpoint.
    done = subprocess.run(["dvc", "repro", "cpt"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert stages_run(done.stdout) == ["cpt"], out[-3000:]
    assert f"cpt: resuming from {ckpt_dir / f'checkpoint-{complete}'} (step {complete})" in out
    watcher.stop.set()
    watcher.join()
    assert watcher.looks > 100 and watcher.partial == [], watcher.partial
    resumed = json.loads((root / "artifacts" / "metrics" / "cpt.json").read_text())
    assert resumed["steps"] == STEPS and resumed["resumed_from_step"] == complete
    assert resumed["steps_this_run"] == STEPS - complete
    resumed_weights = _weights(root / "artifacts" / "models" / "cpt")
    status = subprocess.run(["dvc", "status", "cpt", "--json"], cwd=root, env=env, capture_output=True, text=True)
    assert json.loads(status.stdout) == {}, status.stdout

    # 3. The uninterrupted run: same inputs and seed, no checkpoint to resume from.
    shutil.rmtree(ckpt_dir)
    stage = [sys.executable, "-m", "stages.cpt"]
    done = subprocess.run(stage, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "resuming" not in done.stderr, done.stderr[-3000:]
    reference = json.loads((root / "artifacts" / "metrics" / "cpt.json").read_text())
    assert reference["resumed_from_step"] is None and reference["steps"] == STEPS
    assert resumed["final_train_loss"] == pytest.approx(reference["final_train_loss"], abs=1e-5)
    ref_weights = _weights(root / "artifacts" / "models" / "cpt")
    worst = max((resumed_weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"

    # 4. A byte flipped in the model pretrain wrote: the next stage refuses it, naming both hashes.
    weights = root / "artifacts" / "models" / "pretrain" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    done = subprocess.run(stage, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert f"error: stage cpt: {weights}: content does not match its lineage record (recorded sha256 " in done.stderr
    assert "Traceback" not in done.stderr
