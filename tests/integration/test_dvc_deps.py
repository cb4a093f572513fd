"""dvc.yaml's code deps are complete: every project module a stage's process loads is one of its deps.

Per stage, a fresh interpreter imports the module its `cmd` runs (`python -m stages.<name>`) and
reports the files of every loaded module under posttrain/ or stages/; each must lie in a file or
folder that stage lists under `deps`. A missing dep would let DVC keep a cached output after the
code that made it changed (issue "Reproducibility you can trust", item 3).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROJECT_DIRS = ("posttrain", "stages")
PROBE = """
import importlib, json, os, sys
importlib.import_module(sys.argv[1])
root = os.path.realpath(sys.argv[2])
files = set()
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path:
        path = os.path.realpath(path)
        if path.startswith(root + os.sep):
            files.add(os.path.relpath(path, root))
print(json.dumps(sorted(files)))
"""


def stage_modules(dvc_yaml: Path) -> dict[str, tuple[str, list[str]]]:
    """stage -> (the module its cmd runs, its deps)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage: its template
        match = re.fullmatch(r"python -m ([\w.]+)( --variant \$\{key\})?", stage["cmd"].strip())
        assert match, f"dvc.yaml stage {name}: cmd {stage['cmd']!r} is not `python -m <module>`"
        out[name] = (match.group(1), [str(d) if isinstance(d, str) else next(iter(d)) for d in stage["deps"]])
    return out


def loaded_project_files(module: str, root: Path) -> list[str]:
    """Files under posttrain/ and stages/ that importing `module` in a fresh interpreter loads."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, module, str(root)], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    files = json.loads(done.stdout.strip().splitlines()[-1])
    return [f for f in files if f.split("/", 1)[0] in PROJECT_DIRS]


def uncovered(files: list[str], deps: list[str]) -> list[str]:
    """The files that no dep covers (a dep covers itself and, when it is a folder, everything under it)."""
    clean = [d.rstrip("/") for d in deps]
    return [f for f in files if not any(f == d or f.startswith(d + "/") for d in clean)]


def test_the_checker_finds_a_missing_dep() -> None:
    files = ["stages/sft.py", "posttrain/config.py", "posttrain/training/job.py", "posttrain/training/inputs.py"]
    assert uncovered(files, ["stages/sft.py", "posttrain/config.py", "posttrain/training"]) == []
    assert uncovered(files, ["stages/sft.py", "posttrain/training/job.py"]) == [
        "posttrain/config.py",
        "posttrain/training/inputs.py",
    ]
    assert uncovered(["posttrain/trainingx.py"], ["posttrain/training"]) == ["posttrain/trainingx.py"]


def test_probe_sees_an_incomplete_deps_list() -> None:
    """End to end on a real stage: dropping one folder from its deps is reported."""
    module, deps = stage_modules(REPO / "dvc.yaml")["sft"]
    files = loaded_project_files(module, REPO)
    assert "posttrain/training/job.py" in files
    missing = uncovered(files, [d for d in deps if d != "posttrain/training"])
    assert missing and all(f.startswith("posttrain/training/") for f in missing)


@pytest.mark.parametrize("stage", sorted(stage_modules(REPO / "dvc.yaml")))
def test_stage_deps_cover_every_loaded_project_module(stage: str) -> None:
    module, deps = stage_modules(REPO / "dvc.yaml")[stage]
    missing = uncovered(loaded_project_files(module, REPO), deps)
    assert not missing, f"dvc.yaml stage {stage}: add to deps (package folder or file): {missing}"
