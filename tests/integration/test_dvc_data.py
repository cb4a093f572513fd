"""Real `dvc repro` of the data stages in a throwaway copy of the project.

First run builds prepare and mix; a second run does nothing; changing mixtures.grpo.total reruns
mix only (prepare stays cached). Times are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e


def dvc(root: Path, *args: str) -> tuple[str, float]:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    env.pop("PYTHONPATH", None)  # the stages must import the copy's posttrain, not the repo's
    started = time.perf_counter()
    done = subprocess.run([str(bin_dir / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{output}"
    return output, seconds


def test_dvc_repro_data_stages(project_copy: Path) -> None:
    root = project_copy
    out, first = dvc(root, "repro", "mix")
    assert "Running stage 'prepare'" in out and "Running stage 'mix'" in out
    grpo_manifest = root / "artifacts/data/mixtures/grpo/manifest.json"
    assert json.loads(grpo_manifest.read_text())["total"] == 200
    prepared_mtime = (root / "artifacts/data/prepared/manifest.json").stat().st_mtime_ns
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "mix"}

    out, noop = dvc(root, "repro", "mix")
    assert "Running stage" not in out, out
    assert "didn't change" in out or "up to date" in out

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["mixtures"]["grpo"]["total"] = 150
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out, changed = dvc(root, "repro", "mix")
    assert "Running stage 'mix'" in out and "Running stage 'prepare'" not in out, out
    assert json.loads(grpo_manifest.read_text())["total"] == 150
    assert (root / "artifacts/data/prepared/manifest.json").stat().st_mtime_ns == prepared_mtime

    metrics = {s: json.loads((root / f"artifacts/metrics/{s}.json").read_text())["seconds"] for s in ("prepare", "mix")}
    print(
        f"\ndvc repro mix: first {first:.2f} s (prepare {metrics['prepare']:.2f} s, mix {metrics['mix']:.2f} s "
        f"inside the stages), no-op {noop:.2f} s, after mixtures.grpo.total change {changed:.2f} s"
    )
