"""`posttrain seeds N`: the recipe under N seeds as DVC experiments, aggregated.

Queues one DVC experiment per seed (`dvc exp run --queue -S seed=<s> -n <name>`), runs the queue
to the end (`dvc exp run --run-all -j <jobs>`, which blocks until the queue is empty), reads each
experiment's `artifacts/metrics/eval.json` back from DVC (`dvc.api.read` with the experiment's
name as revision), and writes seeds.json and its plot (posttrain.scoring.seeds).

Each seed is a real experiment: cached by DVC, listed by `dvc exp show`, appliable with
`dvc exp apply <name>`. `seed` feeds the training stages only (data has its own `data.seed`), so
the spread is the training's, on one data set.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from posttrain.errors import SeedsError
from posttrain.io import write_json_atomic
from posttrain.lineage import cpu_model, git_state
from posttrain.pipeline.dag import dvc_command
from posttrain.scoring.plots import seeds_plot
from posttrain.scoring.report import EvalReport
from posttrain.scoring.seeds import EVAL_PATH, PLOT_PATH, SEEDS_PATH, aggregate, workspace_recipe_hash

# --------------------------------------------------------------------------- the sweep (DVC experiments)


def experiment_names(seeds: list[int], stamp: str) -> dict[int, str]:
    """One experiment name per seed; the stamp keeps a later sweep from clashing with an earlier one."""
    return {seed: f"seed-{seed}-{stamp}" for seed in seeds}


def queue_commands(names: Mapping[int, str]) -> list[list[str]]:
    return [dvc_command("exp", "run", "--queue", "-S", f"seed={seed}", "-n", name) for seed, name in names.items()]


def _dvc(root: Path, argv: list[str]) -> None:
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SeedsError(f"`{' '.join(argv[2:])}` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def read_experiment_eval(root: Path, name: str) -> EvalReport | None:
    """An experiment's evaluation report, or None when the experiment does not exist or has none (it failed)."""
    import dvc.api
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    try:
        return EvalReport.parse(json.loads(dvc.api.read(EVAL_PATH, repo=str(root), rev=name)), f"{EVAL_PATH}@{name}")
    except (DvcException, SCMError, FileNotFoundError, json.JSONDecodeError):
        return None


def run_sweep(root: Path, seeds: list[int], jobs: int = 1) -> tuple[dict[str, Any], list[int]]:
    """Queue, run and aggregate; writes seeds.json and the plot. Returns (summary, failed seeds)."""
    names = experiment_names(seeds, time.strftime("%Y%m%d-%H%M%S"))
    for argv in queue_commands(names):
        _dvc(root, argv)
    # Blocks until the queue is empty; a failed experiment does not stop the others.
    subprocess.run(dvc_command("exp", "run", "--run-all", "--jobs", str(jobs)), cwd=root)
    results = {seed: data for seed, name in names.items() if (data := read_experiment_eval(root, name)) is not None}
    failed = [seed for seed in seeds if seed not in results]
    if not results:
        raise SeedsError(f"no experiment of seeds {seeds} produced {EVAL_PATH}; see `dvc queue logs <name>`")
    git = git_state(root)
    summary = {
        **aggregate(results),
        # Where the figures come from (docs tables name them): the date, the machine and the code.
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu_model": cpu_model(), "cores": len(os.sched_getaffinity(0))},
        "code_commit": (git.get("commit") or "unknown")[:7] + ("+dirty" if git.get("dirty") else ""),
        "recipe_hash": workspace_recipe_hash(root),
        "experiments": {str(s): names[s] for s in results},
        "failed_seeds": failed,
    }
    write_json_atomic(root / SEEDS_PATH, summary)
    seeds_plot(summary, root / PLOT_PATH)
    return summary, failed
