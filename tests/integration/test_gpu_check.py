"""bench/gpu_check.sh --cpu-smoke: the prepared GPU check's code at toy size on CPU, so that it cannot rot
before a GPU runs it. Every trainer stage of the throughput recipe against the bare TRL script with the
stage's settings, MFU fields, and FSDP2 at world size 1 writing a loadable full model (about a minute)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "w")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu-smoke" and "out_of_time" not in result
    assert list(result["stages"]) == ["cpt", "sft", "dpo", "grpo"]
    for stage, entry in result["stages"].items():
        assert "error" not in entry, (stage, entry.get("error"))
        s, bare = entry["stage"], entry["bare"]
        assert s["steps_this_run"] == bare["steps"] == result["steps"][stage]
        # Same model, data, seed and settings on both sides: the same final loss.
        assert entry["same_final_loss"], (stage, s["final_train_loss"], bare["final_train_loss"])
        assert bare["settings"] == s["gpu_settings"]  # the bare run got the stage's resolved settings
        # MFU fields on CPU: FLOPs and achieved TFLOP/s computed, MFU null with the reason (no CPU peak).
        assert s["flops_per_token"] > 0 and s["achieved_tflops"] > 0 and s["mfu"] is None
        assert "set compute.peak_tflops" in s["mfu_basis"]["peak"]
        assert entry["tokens_per_second_ratio"] > 0
    # DPO counts the reference forward, the others none.
    assert result["stages"]["dpo"]["stage"]["mfu_basis"]["extra_forwards"] == 1
    assert result["stages"]["sft"]["stage"]["mfu_basis"]["extra_forwards"] == 0
    fsdp = result["fsdp"]
    assert fsdp["ok"], fsdp
    assert fsdp["distributed"]["world_size"] == 1 and fsdp["loaded"]["finite_logits"]
    assert result["targets"]["note"].startswith("not measured")
    assert "| cpt |" in done.stdout  # the rendered table
