"""Seed sweep, the pure parts: aggregation, the stage targets, the plot, and the promotion rules's seed rule."""

from __future__ import annotations

import pytest
from helpers.tiny import tiny_raw
from helpers.tracking import score

from posttrain.errors import SeedsError
from posttrain.scoring import seeds
from posttrain.scoring.plots import seeds_plot
from posttrain.scoring.report import EvalReport


def _eval(scores: dict[str, dict[str, float]], forgetting: dict[str, dict[str, float]] | None = None) -> EvalReport:
    """A minimal evaluation report (docs/eval-schema.md): stage -> domain -> exact-match mean."""
    stages = list(scores)
    domains = list(dict.fromkeys(d for cells in scores.values() for d in cells))
    return EvalReport.parse(
        {
            "schema_version": 1,
            "stages": stages,
            "domains": domains,
            "models": {
                stage: {
                    "domains": {d: {"exact_match": score(m, 0.03, 500)} for d, m in cells.items()},
                    "forgetting": {
                        d: {"value": v, "ci_low": v - 0.01, "ci_high": v + 0.01}
                        for d, v in (forgetting or {}).get(stage, {}).items()
                    },
                }
                for stage, cells in scores.items()
            },
        }
    )


def test_aggregate_mean_std_range_and_each_seeds_ci():
    runs = {
        2: _eval({"sft": {"add": 0.9, "add3": 0.3}}, {"sft": {"add": 0.1}}),
        1: _eval({"sft": {"add": 0.8, "add3": 0.5}}, {"sft": {"add": 0.3}}),
        3: _eval({"sft": {"add": 1.0}}),  # no add3 for this seed: the cell counts the seeds it has
    }
    out = seeds.aggregate(runs)
    assert out["seeds"] == [1, 2, 3]
    add = out["models"]["sft"]["add"]
    assert add["mean"] == pytest.approx(0.9) and add["std"] == pytest.approx(0.1)
    assert (add["min"], add["max"], add["n_seeds"]) == (0.8, 1.0, 3)
    assert add["per_seed"]["1"] == {
        "mean": 0.8,
        "ci_low": pytest.approx(0.77),
        "ci_high": pytest.approx(0.83),
        "n": 500,
    }
    add3 = out["models"]["sft"]["add3"]
    assert add3["n_seeds"] == 2 and add3["std"] == pytest.approx(0.1414, abs=1e-4)
    forgetting = out["forgetting"]["sft"]["add"]
    assert forgetting["mean"] == pytest.approx(0.2) and forgetting["per_seed"] == {"1": 0.3, "2": 0.1}
    assert seeds.spread(out, "sft", "add") == pytest.approx(0.1)
    assert seeds.spread(out, "merge", "add") is None


def test_single_seed_has_no_std_and_empty_input_is_an_error():
    out = seeds.aggregate({5: _eval({"sft": {"add": 0.7}})})
    assert out["models"]["sft"]["add"]["std"] is None
    with pytest.raises(SeedsError, match="no seed results"):
        seeds.aggregate({})


def test_stage_targets_per_seed():
    good = _eval({"sft": {"add": 0.95, "add3": 0.3}, "dpo": {"add": 0.95, "add3": 0.35}, "grpo": {"add3": 0.4}})
    bad = _eval({"sft": {"add": 0.85, "add3": 0.3}, "dpo": {"add": 0.80, "add3": 0.35}, "grpo": {"add3": 0.35}})
    out = seeds.aggregate({1: good, 2: bad, 3: _eval({"sft": {"add": 0.95}})})
    assert all(t["passed"] for t in out["targets"]["1"].values())
    assert {name: t["passed"] for name, t in out["targets"]["2"].items()} == {
        "sft_add": False,
        "dpo_add_not_below_sft": False,
        "grpo_raises_add3": False,  # equal is not a raise
    }
    assert out["targets"]["3"]["grpo_raises_add3"]["passed"] is None  # no dpo/grpo in that run
    assert out["targets_failed"] == [
        "seed 2: dpo_add_not_below_sft",
        "seed 2: grpo_raises_add3",
        "seed 2: sft_add",
    ]


def test_plot_is_written(tmp_path):
    out = seeds.aggregate({1: _eval({"sft": {"add": 0.8}}), 2: _eval({"sft": {"add": 0.9}})})
    path = seeds_plot(out, tmp_path / "plots" / "seeds.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_champion_gate_requires_improvement_beyond_seed_std():
    from posttrain.config import PromotionConfig
    from posttrain.scoring.report import EvalReport
    from posttrain.tracking.rules import Champion, champion_check

    def report(stage: str, add3: float) -> EvalReport:
        return EvalReport.parse({"models": {stage: {"domains": {"add3": {"exact_match": score(add3, 0.01)}}}}})

    rule = PromotionConfig(compare_domain="add3", min_improvement=0.0)
    champion = Champion("1", "merge", report("merge", 0.50))

    def beats(seed_std: float | None) -> bool:
        (check,) = champion_check(rule, report("grpo", 0.56), "grpo", champion, seed_std=seed_std)
        return check.passed

    # +0.06 with CIs of +-0.01: beyond one run's noise ...
    assert beats(None)
    assert beats(0.04)
    # ... but not beyond a seed spread of 0.08.
    assert not beats(0.08)


def test_a_sweep_counts_only_for_the_recipe_it_ran(tmp_path) -> None:
    import json

    import yaml

    raw = tiny_raw()
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    path = tmp_path / seeds.SEEDS_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {**seeds.aggregate({1: _eval({"sft": {"add": 0.9}}), 2: _eval({"sft": {"add": 0.8}})}),
               "recipe_hash": seeds.workspace_recipe_hash(tmp_path)}  # fmt: skip
    path.write_text(json.dumps(summary))
    assert seeds.current_summary(tmp_path)["seeds"] == [1, 2]
    # Another seed, other tracking or promotion settings: the same recipe.
    same = {**raw, "seed": raw["seed"] + 7, "tracking": {**raw["tracking"], "experiment": "other"}}
    assert seeds.recipe_hash(same) == seeds.recipe_hash(raw)
    params_file.write_text(yaml.safe_dump(same))
    assert seeds.current_summary(tmp_path) is not None
    # A training setting changed: the old spread is not this recipe's.
    edited = yaml.safe_load(yaml.safe_dump(raw))
    edited["sft"]["trainer"]["learning_rate"] *= 2
    assert seeds.recipe_hash(edited) != seeds.recipe_hash(raw)
    params_file.write_text(yaml.safe_dump(edited))
    assert seeds.current_summary(tmp_path) is None
    # A seeds.json from before recipe hashes were recorded is not trusted either.
    params_file.write_text(yaml.safe_dump(raw))
    path.write_text(json.dumps({k: v for k, v in summary.items() if k != "recipe_hash"}))
    assert seeds.current_summary(tmp_path) is None
