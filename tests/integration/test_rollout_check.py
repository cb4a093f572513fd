"""bench/rollout_check.sh --cpu-smoke: the GPU check's own code, at toy size on CPU, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers.tiny import REPO


def test_rollout_check_cpu_smoke_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "rollout_check.json"
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "rollout_check.sh"), "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu-smoke" and result["device"] == "cpu"
    rollouts = result["rollouts"]
    assert rollouts["rollouts_per_run"] == 16
    for engine in ("hf", "paged"):
        # Every rollout runs its full length (no EOS), whichever engine generates it.
        assert [run["generated_tokens"] for run in rollouts["runs"][engine]] == [16 * 16]
        assert rollouts["tokens_per_second"][engine] > 0
        split = result["grpo"][engine]["split"]
        # Step 1 warms up; in GRPO a rollout may stop at EOS (TRL stops on the tokenizer's EOS).
        assert split["steps"] == 1 and 0 < split["generated_tokens"] <= 16 * 16
        assert sum(split["share"].values()) > 0.99
    assert 0.0 <= rollouts["greedy_agreement"]["sequences_identical"] <= 1.0
    assert result["targets"].startswith("not judged") and "cannot travel" in result["vllm"]
    assert "| paged |" in done.stdout  # the rendered table
