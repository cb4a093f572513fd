"""Seed sweep: the queue -> run -> read-back path with real DVC experiments on a trivial one-stage project."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from posttrain.pipeline.sweep import run_sweep
from posttrain.scoring import seeds


@pytest.mark.slow
def test_sweep_queues_one_dvc_experiment_per_seed_and_reads_each_back(tmp_path):
    """Real `dvc exp run --queue` / `--run-all` on a one-stage project whose eval.json depends on the seed."""
    root = tmp_path / "project"
    root.mkdir()
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t")
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    (root / "params.yaml").write_text("seed: 10\n")
    (root / "evaluate.py").write_text(
        "import json, pathlib, yaml\n"
        "seed = yaml.safe_load(open('params.yaml'))['seed']\n"
        "doc = {'stages': ['sft'], 'domains': ['add'], 'models': {'sft': {'domains': {'add': {'exact_match':"
        " {'mean': seed / 100, 'ci_low': seed / 100 - 0.01, 'ci_high': seed / 100 + 0.01, 'n': 5}}}}}}\n"
        "out = pathlib.Path('artifacts/metrics'); out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'eval.json').write_text(json.dumps(doc))\n"
    )
    stage = {
        "cmd": f"{sys.executable} evaluate.py",
        "deps": ["evaluate.py"],
        "params": ["seed"],
        "metrics": [{"artifacts/metrics/eval.json": {"cache": False}}],
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": stage}}))
    for argv in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(argv, cwd=root, env=env, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=root, env=env, check=True)

    old = dict(os.environ)
    os.environ.update(env)
    try:
        summary, failed = run_sweep(root, [10, 11], jobs=1)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert failed == []
    assert summary["seeds"] == [10, 11]
    assert summary["models"]["sft"]["add"]["mean"] == pytest.approx(0.105)
    written = json.loads((root / seeds.SEEDS_PATH).read_text())
    assert written["experiments"].keys() == {"10", "11"}
    # The recipe the sweep ran (seed aside): the gate ignores the spread once params.yaml changes.
    assert written["recipe_hash"] == seeds.recipe_hash({"seed": 10}) == seeds.workspace_recipe_hash(root)
    assert (root / seeds.PLOT_PATH).is_file()
    listed = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=root, env=env, capture_output=True, text=True
    ).stdout.split()
    assert sorted(listed) == sorted(summary["experiments"].values())
