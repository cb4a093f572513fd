"""Seed variance as a result: the recipe under N seeds as DVC experiments, aggregated.

`posttrain seeds N` queues one DVC experiment per seed (`dvc exp run --queue -S seed=<s> -n <name>`),
runs the queue to the end (`dvc exp run --run-all -j <jobs>`, which blocks until the queue is
empty), reads each experiment's `artifacts/metrics/eval.json` back from DVC (`dvc.api.read` with
the experiment's name as revision), and writes

    artifacts/metrics/seeds.json   per model x domain: mean, std, min, max of exact match over the
                                   seeds and each seed's value with its bootstrap CI; forgetting the
                                   same way; the recipe's stage targets per seed
    artifacts/plots/seeds.png      mean +- std per model x domain, each seed's value as a dot

Each seed is a real experiment: cached by DVC, listed by `dvc exp show`, appliable with
`dvc exp apply <name>`. `seed` feeds the training stages only (data has its own `data.seed`), so
the spread is the training's, on one data set. `aggregate` is a pure function of the eval.json
documents (docs/eval-schema.md); the promotion gate reads `spread` from seeds.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from posttrain.dag import dvc_command
from posttrain.errors import PipelineError
from posttrain.lineage import write_json_atomic

EVAL_PATH = "artifacts/metrics/eval.json"
SEEDS_PATH = "artifacts/metrics/seeds.json"
PLOT_PATH = "artifacts/plots/seeds.png"
SCHEMA_VERSION = 1


class SeedsError(PipelineError):
    """The seed sweep could not be queued, run or read back."""


# --------------------------------------------------------------------------- aggregation (pure)


def _spread(values: dict[int, float]) -> dict[str, Any]:
    numbers = list(values.values())
    return {
        "mean": statistics.fmean(numbers),
        # Sample standard deviation; undefined for a single seed.
        "std": statistics.stdev(numbers) if len(numbers) > 1 else None,
        "min": min(numbers),
        "max": max(numbers),
        "n_seeds": len(numbers),
    }


def _exact(evaluation: Mapping[str, Any], stage: str, domain: str) -> dict[str, Any] | None:
    return ((evaluation.get("models") or {}).get(stage, {}).get("domains", {}).get(domain) or {}).get("exact_match")


def _target(passed: bool | None, detail: str) -> dict[str, Any]:
    return {"passed": passed, "detail": detail}


def stage_targets(evaluation: Mapping[str, Any], sft_min_add: float = 0.9) -> dict[str, dict[str, Any]]:
    """The default recipe's stage targets on one run's eval.json (passed None: a stage is missing)."""

    def em(stage: str, domain: str) -> float | None:
        score = _exact(evaluation, stage, domain)
        return None if score is None else score["mean"]

    sft_add, dpo_add, dpo_add3, grpo_add3 = em("sft", "add"), em("dpo", "add"), em("dpo", "add3"), em("grpo", "add3")
    return {
        "sft_add": _target(None, "no sft/add score")
        if sft_add is None
        else _target(sft_add >= sft_min_add, f"sft add {sft_add:.3f} (needs >= {sft_min_add})"),
        "dpo_add_not_below_sft": _target(None, "no sft/add or dpo/add score")
        if sft_add is None or dpo_add is None
        else _target(dpo_add >= sft_add, f"dpo add {dpo_add:.3f} vs sft {sft_add:.3f}"),
        "grpo_raises_add3": _target(None, "no dpo/add3 or grpo/add3 score")
        if dpo_add3 is None or grpo_add3 is None
        else _target(grpo_add3 > dpo_add3, f"grpo add3 {grpo_add3:.3f} vs dpo {dpo_add3:.3f}"),
    }


def aggregate(evaluations: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """seed -> eval.json document  ->  the seeds.json document (see the module docstring)."""
    if not evaluations:
        raise SeedsError("no seed results to aggregate; expected at least one eval.json")
    seeds = sorted(evaluations)
    models: dict[str, dict[str, Any]] = {}
    forgetting: dict[str, dict[str, Any]] = {}
    stages = list(dict.fromkeys(s for seed in seeds for s in evaluations[seed].get("stages") or []))
    domains = list(dict.fromkeys(d for seed in seeds for d in evaluations[seed].get("domains") or []))
    for stage in stages:
        for domain in domains:
            per_seed = {seed: score for seed in seeds if (score := _exact(evaluations[seed], stage, domain))}
            if per_seed:
                models.setdefault(stage, {})[domain] = {
                    **_spread({seed: s["mean"] for seed, s in per_seed.items()}),
                    "per_seed": {
                        str(seed): {k: s.get(k) for k in ("mean", "ci_low", "ci_high", "n")}
                        for seed, s in per_seed.items()
                    },
                }
            values = {
                seed: f["value"]
                for seed in seeds
                if (
                    f := ((evaluations[seed].get("forgetting") or {}).get("forgetting") or {})
                    .get(stage, {})
                    .get(domain)
                )
            }
            if values:
                forgetting.setdefault(stage, {})[domain] = {
                    **_spread(values),
                    "per_seed": {str(seed): v for seed, v in values.items()},
                }
    targets = {str(seed): stage_targets(evaluations[seed]) for seed in seeds}
    failed = sorted(f"seed {s}: {name}" for s, t in targets.items() for name, r in t.items() if r["passed"] is False)
    return {
        "schema_version": SCHEMA_VERSION,
        "metric": "exact_match",
        "seeds": seeds,
        "models": models,
        "forgetting": forgetting,
        "targets": targets,
        "targets_failed": failed,
    }


def spread(summary: Mapping[str, Any], stage: str, domain: str) -> float | None:
    """The seed standard deviation of `stage`'s exact match on `domain` (None: not in the sweep)."""
    return ((summary.get("models") or {}).get(stage, {}).get(domain) or {}).get("std")


def read_summary(root: Path) -> dict[str, Any] | None:
    path = root / SEEDS_PATH
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SeedsError(f"{path}: not valid JSON ({error}); rerun `posttrain seeds N` or delete it") from None


# --------------------------------------------------------------------------- plot


def write_plot(summary: Mapping[str, Any], path: Path) -> Path:
    """Mean +- std bars per model x domain, each seed's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(stage, domain, cell) for stage, cells in summary["models"].items() for domain, cell in cells.items()]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.28 * len(rows) + 1)))
    for y, (_stage, _domain, cell) in enumerate(rows):
        ax.barh(y, cell["mean"], xerr=cell["std"] or 0.0, color="#9ecae1", capsize=3)
        points = [s["mean"] for s in cell["per_seed"].values()]
        ax.plot(points, [y] * len(points), "o", color="#08519c", markersize=4)
    ax.set_yticks(range(len(rows)), [f"{stage}/{domain}" for stage, domain, _ in rows])
    ax.invert_yaxis()
    ax.set(
        xlim=(-0.02, 1.02),
        xlabel="greedy exact match (bar: mean +- std over seeds; dots: seeds)",
        title=f"{len(summary['seeds'])} seeds: {', '.join(map(str, summary['seeds']))}",
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


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


def read_experiment_eval(root: Path, name: str) -> dict[str, Any] | None:
    """An experiment's eval.json, or None when the experiment does not exist or has none (it failed)."""
    import dvc.api
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    try:
        return json.loads(dvc.api.read(EVAL_PATH, repo=str(root), rev=name))
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
    summary = {**aggregate(results), "experiments": {str(s): names[s] for s in results}, "failed_seeds": failed}
    write_json_atomic(root / SEEDS_PATH, summary)
    write_plot(summary, root / PLOT_PATH)
    return summary, failed
