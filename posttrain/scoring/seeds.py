"""Seed variance as a result: the eval.json documents of one recipe under N seeds, aggregated.

`posttrain seeds N` (posttrain.pipeline.sweep) runs the recipe once per seed as DVC experiments and
hands their eval.json documents (docs/eval-schema.md) to `aggregate`, a pure function, which yields

    artifacts/metrics/seeds.json   per model x domain: mean, std, min, max of exact match over the
                                   seeds and each seed's value with its bootstrap CI; forgetting the
                                   same way; the recipe's stage targets per seed
    artifacts/plots/seeds.png      mean +- std per model x domain, each seed's value as a dot

The promotion rules (posttrain.tracking.rules) read the seed spread from seeds.json, only while the
recipe is the one the sweep ran (`recipe_hash`: params.yaml as written, without the seed and the
keys that change no model or score); after a recipe edit the old spread says nothing and is ignored.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from posttrain.config import params_hash, read_yaml
from posttrain.errors import SeedsError
from posttrain.scoring.report import EvalReport

log = logging.getLogger(__name__)

EVAL_PATH = "artifacts/metrics/eval.json"
SEEDS_PATH = "artifacts/metrics/seeds.json"
PLOT_PATH = "artifacts/plots/seeds.png"
SCHEMA_VERSION = 1
# Keys that change neither a trained model nor a score: a sweep stays valid when only they change.
NOT_RECIPE_KEYS = ("seed", "tracking", "promotion", "orchestration")


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


def _exact(evaluation: EvalReport, stage: str, domain: str) -> dict[str, Any] | None:
    score = evaluation.exact_match(stage).get(domain)
    return score.model_dump() if score is not None else None


def _forgetting(evaluation: EvalReport, stage: str, domain: str) -> float | None:
    model = evaluation.model(stage)
    value = (model.forgetting if model else {}).get(domain)
    return value.get("value") if isinstance(value, dict) else value


def _target(passed: bool | None, detail: str) -> dict[str, Any]:
    return {"passed": passed, "detail": detail}


def stage_targets(evaluation: EvalReport, sft_min_add: float = 0.9) -> dict[str, dict[str, Any]]:
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


def aggregate(evaluations: Mapping[int, EvalReport]) -> dict[str, Any]:
    """seed -> evaluation report  ->  the seeds.json document (see the module docstring)."""
    if not evaluations:
        raise SeedsError("no seed results to aggregate; expected at least one eval.json")
    seeds = sorted(evaluations)
    models: dict[str, dict[str, Any]] = {}
    forgetting: dict[str, dict[str, Any]] = {}
    stages = list(dict.fromkeys(s for seed in seeds for s in evaluations[seed].stages))
    domains = list(dict.fromkeys(d for seed in seeds for d in evaluations[seed].domains))
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
            values = {seed: f for seed in seeds if (f := _forgetting(evaluations[seed], stage, domain)) is not None}
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


def difference_spread(summary: Mapping[str, Any], stage: str, other: str, domain: str) -> float | None:
    """The seed standard deviation of the difference `stage` - `other` in exact match on `domain`, over the
    seeds where both were scored (None: fewer than two). Two models of one run share its seed and its test
    items: the spread of their difference is what a paired comparison must allow for, not either level's."""
    models = summary.get("models") or {}
    ours = ((models.get(stage) or {}).get(domain) or {}).get("per_seed") or {}
    theirs = ((models.get(other) or {}).get(domain) or {}).get("per_seed") or {}
    common = sorted(set(ours) & set(theirs))
    if len(common) < 2:
        return None
    return statistics.stdev(ours[s]["mean"] - theirs[s]["mean"] for s in common)


def read_summary(root: Path) -> dict[str, Any] | None:
    path = root / SEEDS_PATH
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SeedsError(f"{path}: not valid JSON ({error}); rerun `posttrain seeds N` or delete it") from None


def recipe_hash(raw: Mapping[str, Any]) -> str:
    """Hash of the recipe a sweep ran: params.yaml as parsed (every key it writes, defaults left out),
    except the seed and NOT_RECIPE_KEYS."""
    return params_hash({key: value for key, value in raw.items() if key not in NOT_RECIPE_KEYS})


def workspace_recipe_hash(root: Path) -> str:
    return recipe_hash(read_yaml(root / "params.yaml"))


def current_summary(root: Path) -> dict[str, Any] | None:
    """seeds.json when it was measured on the workspace's recipe; None (with a warning) when params.yaml
    changed since."""
    summary = read_summary(root)
    if summary is None:
        return None
    recorded, now = summary.get("recipe_hash"), workspace_recipe_hash(root)
    if recorded != now:
        log.warning(
            "%s: measured on recipe %s, params.yaml is now recipe %s; its seed spread is ignored "
            "(rerun `posttrain seeds N`)",
            SEEDS_PATH,
            recorded or "(not recorded)",
            now,
        )
        return None
    return summary
