"""GRPO kill-and-resume, for real: the stage is SIGKILLed after a checkpoint is complete and rerun.

GRPO rollouts are sampled, so losses are not compared; what must hold is the data order and the
step count: the resumed run sees exactly the prompt batches an uninterrupted run sees from the
checkpoint's step on, and stops at max_steps. The prompts of every optimisation step are recorded
by an extra zero-weight reward function registered in the stage process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from helpers.projects import DPO_GRPO, build_trained_input_project
from helpers.tiny import tiny_raw

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 24
SAVE = 4
KILL_AFTER = 8

# Runs the real grpo stage with one extra reward that appends (step, prompts) to a log file.
LAUNCHER = textwrap.dedent(
    """
    import json, sys
    from posttrain.scoring import rewards

    log_path, root = sys.argv[1], sys.argv[2]

    def log_prompts(completions, answer, prompts=None, trainer_state=None, **_):
        if trainer_state is not None:  # only rollouts of training, not the before/after scoring
            with open(log_path, "a") as handle:
                handle.write(json.dumps([trainer_state.global_step, sorted(set(prompts))]) + "\\n")
        return [0.0] * len(completions)

    rewards.REWARDS["log_prompts"] = log_prompts
    from posttrain.pipeline.entry import stage_main
    from stages import grpo

    stage_main("grpo", grpo.run, ["--root", root])
    """
)


def _raw_params() -> dict:
    raw = tiny_raw(DPO_GRPO)
    raw["compute"]["num_threads"] = 1
    raw["grpo"]["trainer"] = {
        "max_steps": STEPS,
        "save_steps": SAVE,
        "logging_steps": 1,
        "per_device_train_batch_size": 8,
    }
    raw["grpo"]["num_generations"] = 4
    raw["grpo"]["rewards"] = [{"name": "digit_match", "weight": 1.0}, {"name": "log_prompts", "weight": 0.0}]
    return raw


@pytest.fixture(scope="module")
def projects(tmp_path_factory) -> tuple[Path, Path]:
    """Two identical project roots with prepared data, mixtures and a tiny 'dpo' model."""
    from posttrain.config import parse_params

    raw = _raw_params()
    raw_for_validation = json.loads(json.dumps(raw))
    # log_prompts exists only in the stage process; validate here with the real reward alone.
    raw_for_validation["grpo"]["rewards"] = raw["grpo"]["rewards"][:1]
    first = tmp_path_factory.mktemp("interrupted")
    build_trained_input_project(parse_params(raw_for_validation), first, "dpo")
    (first / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (first / "dvc.yaml").write_text("stages: {}\n")
    second = tmp_path_factory.mktemp("reference") / "project"
    shutil.copytree(first, second)
    return first, second


def _start(root: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(log), str(root)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _entries(log: Path) -> list[tuple[int, list[str]]]:
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]


def test_killed_grpo_resumes_with_the_same_data_order_and_step_count(projects):
    interrupted, reference = projects
    reference_log = reference / "prompts.jsonl"
    _finish(_start(reference, reference_log))
    expected = _entries(reference_log)
    assert [step for step, _ in expected] == list(range(STEPS))

    log = interrupted / "prompts.jsonl"
    proc = _start(interrupted, log)
    deadline = time.time() + 300
    while not list((interrupted / "checkpoints").glob(f"grpo-*/checkpoint-{KILL_AFTER}/COMPLETE")):
        assert proc.poll() is None, "the stage ended before it could be killed"
        assert time.time() < deadline, "no complete checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before_kill = _entries(log)
    assert not (interrupted / "artifacts" / "models" / "grpo").exists()  # nothing taken as finished
    # Up to the kill, the rollouts saw the reference's prompts in the reference's order.
    assert before_kill == expected[: len(before_kill)]

    out = _finish(_start(interrupted, log))
    resumed_from = max(
        int(path.parent.name.split("-")[1])
        for path in (interrupted / "checkpoints").glob("grpo-*/checkpoint-*/COMPLETE")
        if int(path.parent.name.split("-")[1]) <= len(before_kill)
    )
    assert f"checkpoint-{resumed_from}" in out and "resum" in out.lower(), out[-3000:]
    after_resume = _entries(log)[len(before_kill) :]
    # The resumed run continues at the checkpoint's step with exactly the reference's batches.
    assert after_resume == [entry for entry in expected if entry[0] >= resumed_from]
    metrics = json.loads((interrupted / "artifacts" / "metrics" / "grpo.json").read_text())
    assert metrics["steps"] == STEPS
