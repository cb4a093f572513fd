"""The promotion rules (posttrain.tracking.rules) on hand-built evaluation reports: no MLflow, no models."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.tiny import tiny_params

from posttrain.config import PromotionConfig
from posttrain.errors import ParamsError
from posttrain.layout import Layout
from posttrain.scoring import seeds
from posttrain.scoring.intervals import mean_ci
from posttrain.scoring.report import EvalReport, lineage_of
from posttrain.tracking import rules

CHAIN = {"pretrain": [], "sft": ["pretrain"], "dpo": ["sft"], "grpo": ["dpo"]}


def items(n: int, hits: int, seed: int = 0) -> str:
    """A per-item result string with `hits` ones among `n`, at positions fixed by `seed`."""
    ones = set(random.Random(seed).sample(range(n), hits))
    return "".join("1" if i in ones else "0" for i in range(n))


def flip(correct: str, lose: int, gain: int = 0) -> str:
    """The same items with the first `lose` hits turned into misses and the first `gain` misses into hits."""
    hits = [i for i, c in enumerate(correct) if c == "1"][:lose]
    misses = [i for i, c in enumerate(correct) if c == "0"][:gain]
    chars = list(correct)
    for i in hits:
        chars[i] = "0"
    for i in misses:
        chars[i] = "1"
    return "".join(chars)


def report(models: dict[str, dict[str, str]], chain: dict[str, list[str]] = CHAIN, **top: Any) -> EvalReport:
    """An EvalReport from per-item strings, with each model's lineage walked through `chain`."""

    def ancestors(stage: str) -> list[dict[str, Any]]:
        found, frontier = [], [stage]
        while frontier:
            child = frontier.pop(0)
            for parent in chain.get(child, []):
                found.append({"stage": parent, "content_hash": f"hash-{parent}", "via": child})
                frontier.append(parent)
        return found

    entries = {}
    for stage, per_domain in models.items():
        domains = {}
        for domain, correct in per_domain.items():
            hits = np.array([c == "1" for c in correct], dtype=float)
            domains[domain] = {"exact_match": mean_ci(hits, samples=1000, confidence=0.95, seed=0), "correct": correct}
        entries[stage] = {"content_hash": f"hash-{stage}", "lineage": ancestors(stage), "domains": domains}
    config = {"bootstrap_samples": 1000, "confidence": 0.95, "seed": 0}
    return EvalReport.parse({"config": config, "models": entries, "prepared_manifest_hash": "prep", **top})


def promotion(**values: Any) -> PromotionConfig:
    return PromotionConfig(**values)


def statuses(checks: list[rules.Check]) -> dict[str, str]:
    return {g.name: g.status for g in checks}


BASE = items(500, 100)


def test_paired_comparison_is_narrower_than_the_two_intervals() -> None:
    """Two models that differ on 2 of 500 items: the paired interval is tight, the quadrature one is not."""
    data = report({"dpo": {"add": BASE}, "grpo": {"add": flip(BASE, lose=2)}})
    paired = rules.difference(data, "grpo", data, "dpo", "add")
    assert paired is not None and paired.paired and paired.value == pytest.approx(-0.004)
    unpaired = data.model_copy(
        update={
            "models": {
                s: m.model_copy(
                    update={"domains": {d: r.model_copy(update={"correct": None}) for d, r in m.domains.items()}}
                )
                for s, m in data.models.items()
            }
        }
    )
    loose = rules.difference(unpaired, "grpo", unpaired, "dpo", "add")
    assert loose is not None and not loose.paired
    assert paired.high - paired.low < (loose.high - loose.low) / 3


def test_a_regression_beyond_the_margin_is_refused_naming_ancestor_and_domain() -> None:
    data = report(
        {
            "pretrain": {"add": items(500, 10)},
            "sft": {"add": BASE},
            "dpo": {"add": BASE},
            "grpo": {"add": flip(BASE, lose=60)},
        }
    )
    checks = rules.lineage_checks(promotion(), data, "grpo")
    by_name = {g.name: g for g in checks}
    assert by_name["not_worse_than.dpo.add"].status == "fail"
    assert "parent 'dpo' on add" in by_name["not_worse_than.dpo.add"].detail
    assert by_name["not_worse_than.sft.add"].status == "fail"
    assert "ancestor via dpo" in by_name["not_worse_than.sft.add"].detail
    assert by_name["not_worse_than.pretrain.add"].status == "pass"  # still far above the base


def test_a_regression_smaller_than_the_margin_passes() -> None:
    data = report({"dpo": {"add": BASE}, "grpo": {"add": flip(BASE, lose=3)}})
    assert statuses(rules.lineage_checks(promotion(max_regression=0.05), data, "grpo")) == {
        "not_worse_than.dpo.add": "pass"
    }


def test_a_band_wider_than_the_margin_is_inconclusive_and_says_what_would_do() -> None:
    """20 test items cannot tell a 5-point regression from noise: the verdict is inconclusive, not a pass."""
    small = items(20, 10)
    data = report({"dpo": {"add": small}, "grpo": {"add": flip(small, lose=1)}})
    (check,) = rules.lineage_checks(promotion(max_regression=0.05), data, "grpo")
    assert check.status == "inconclusive"
    assert "cannot tell a regression of 0.05" in check.detail and "test items per domain (now 20)" in check.detail
    verdict = rules.decide([check], promotion())
    assert verdict.status == "inconclusive" and not verdict.promote  # the default does not promote
    assert rules.decide([check], promotion(on_inconclusive="promote")).promote


def test_the_margin_is_per_domain() -> None:
    data = report({"dpo": {"add": BASE, "rev": BASE}, "grpo": {"add": flip(BASE, lose=15), "rev": flip(BASE, lose=15)}})
    checks = rules.lineage_checks(promotion(max_regression=0.05, max_regression_per_domain={"rev": 0.01}), data, "grpo")
    assert statuses(checks) == {"not_worse_than.dpo.add": "pass", "not_worse_than.dpo.rev": "fail"}


def test_the_seed_spread_of_the_difference_not_of_the_level_widens_the_band() -> None:
    """The defect: the level's seed std (0.25 on add3) made every regression under 29 points pass. Two models
    of one run share its seed; what varies between seeds is their difference."""
    summary = {
        "models": {
            "dpo": {"add3": {"std": 0.25, "per_seed": {"1": {"mean": 0.47}, "2": {"mean": 0.08}, "3": {"mean": 0.03}}}},
            "grpo": {
                "add3": {"std": 0.25, "per_seed": {"1": {"mean": 0.49}, "2": {"mean": 0.10}, "3": {"mean": 0.04}}}
            },
        }
    }
    spread = seeds.difference_spread(summary, "grpo", "dpo", "add3")
    assert spread == pytest.approx(np.std([0.02, 0.02, 0.01], ddof=1))
    data = report({"dpo": {"add3": BASE}, "grpo": {"add3": flip(BASE, lose=40)}})
    (check,) = rules.lineage_checks(
        promotion(), data, "grpo", lambda c, a, d: seeds.difference_spread(summary, c, a, d)
    )
    assert check.status == "fail" and "seed spread" in check.detail


def test_a_chain_that_learned_nothing_is_refused() -> None:
    """The held-out-model defect: every stage at 0.000 exact match, promoted with 'passed all checks'."""
    zeros = "0" * 200
    data = report({"pretrain": {"add": zeros}, "sft": {"add": zeros}, "dpo": {"add": zeros}, "grpo": {"add": zeros}})
    checks = rules.checks_for(promotion(), data, "grpo")
    assert statuses(checks)["learned"] == "fail"
    assert "learned nothing" in next(g for g in checks if g.name == "learned").detail
    assert not rules.decide(checks, promotion()).promote
    learned = report(
        {
            "pretrain": {"add": zeros},
            "sft": {"add": items(200, 50)},
            "dpo": {"add": items(200, 50)},
            "grpo": {"add": items(200, 50)},
        }
    )
    assert statuses(rules.learning_check(promotion(), learned, "grpo")) == {"learned": "pass"}
    assert rules.learning_check(promotion(require_learning=False), data, "grpo") == []


def test_champion_gate_pass_fail_inconclusive_and_engines() -> None:
    rule = promotion(compare_domain="add", min_improvement=0.0)
    champion_report = report({"merge": {"add": BASE}}, chain={})
    better = report({"grpo": {"add": flip(BASE, lose=0, gain=60)}}, chain={})
    worse = report({"grpo": {"add": flip(BASE, lose=60)}}, chain={})
    same = report({"grpo": {"add": flip(BASE, lose=1, gain=1)}}, chain={})
    champion = rules.Champion("3", "merge", champion_report)
    assert statuses(rules.champion_check(rule, better, "grpo", champion)) == {"beats_champion.add": "pass"}
    assert statuses(rules.champion_check(rule, worse, "grpo", champion)) == {"beats_champion.add": "fail"}
    assert statuses(rules.champion_check(rule, same, "grpo", champion)) == {"beats_champion.add": "inconclusive"}
    assert statuses(rules.champion_check(rule, better, "grpo", None)) == {
        "beats_champion.add": "pass"
    }  # first champion
    paged = better.model_copy(update={"generation": {"engine": "paged"}})
    (check,) = rules.champion_check(rule, paged, "grpo", champion)
    assert check.status == "fail" and "engine 'paged'" in check.detail and "'hf'" in check.detail
    allowed = promotion(compare_domain="add", allow_engine_mismatch=True)
    assert statuses(rules.champion_check(allowed, paged, "grpo", champion)) == {"beats_champion.add": "pass"}


def test_stale_evaluation_of_an_ancestor_fails() -> None:
    data = report({"dpo": {"add": BASE}, "grpo": {"add": BASE}})
    stale = data.models["dpo"].model_copy(update={"content_hash": "an-older-dpo"})
    data = data.model_copy(update={"models": {**data.models, "dpo": stale}})
    (check,) = rules.lineage_checks(promotion(), data, "grpo")
    assert check.status == "fail" and "rerun evaluate" in check.detail


def test_lineage_domains_limit_the_gate() -> None:
    data = report({"dpo": {"add": BASE, "rev": BASE}, "grpo": {"add": BASE, "rev": flip(BASE, lose=90)}})
    assert [g.name for g in rules.lineage_checks(promotion(lineage_domains=["add"]), data, "grpo")] == [
        "not_worse_than.dpo.add"
    ]


def test_lineage_of_walks_the_lineage_files_once_per_ancestor(tmp_path: Path) -> None:
    layout = Layout(tmp_path)

    def lineage(stage: str, parents: list[str]) -> None:
        folder = layout.model(stage)
        folder.mkdir(parents=True, exist_ok=True)
        entries = [{"stage": p, "path": f"artifacts/models/{p}", "content_hash": f"hash-{p}"} for p in parents]
        (folder / "lineage.json").write_text(
            json.dumps({"stage": stage, "content_hash": f"hash-{stage}", "parents": entries})
        )

    lineage("pretrain", [])
    lineage("cpt", ["pretrain"])
    lineage("grpo", ["cpt"])
    lineage("merge", ["grpo", "cpt"])
    found = [(a["stage"], a["via"]) for a in lineage_of(layout, layout.model("merge"))]
    assert found == [("grpo", "merge"), ("cpt", "merge"), ("pretrain", "cpt")]


def test_candidate_rules() -> None:
    data = report(
        {"sft": {"add": items(100, 90), "rev": items(100, 50)}, "merge": {"add": items(100, 80), "rev": items(100, 70)}}
    )
    assert rules.candidate_stage(tiny_params().promotion, data) == ("merge", "promotion.final_stage")
    assert rules.candidate_stage(tiny_params(promotion={"candidate": {"stage": "sft"}}).promotion, data)[0] == "sft"
    best = tiny_params(promotion={"candidate": {"best_of": ["sft", "merge"], "metric": "mean"}})
    assert rules.candidate_stage(best.promotion, data)[0] == "merge"  # mean 0.75 vs 0.70
    on_add = tiny_params(promotion={"candidate": {"best_of": ["sft", "merge"], "metric": "add"}})
    stage, why = rules.candidate_stage(on_add.promotion, data)
    assert stage == "sft" and "sft=0.9000" in why


@pytest.mark.parametrize(
    ("candidate", "key"),
    [
        ({"stage": "sft", "best_of": ["sft"]}, "exactly one of"),
        ({}, "exactly one of"),
        ({"stage": "nope"}, "promotion.candidate.stage"),
        ({"best_of": ["sft", "bad"]}, "promotion.candidate.best_of[1]"),
        ({"best_of": ["sft"], "metric": "mul"}, "promotion.candidate.metric"),
    ],
)
def test_candidate_rule_errors_name_the_key(candidate: dict[str, Any], key: str) -> None:
    with pytest.raises(ParamsError) as info:
        tiny_params(promotion={"candidate": candidate})
    assert key in str(info.value)


def test_verdict_without_tracking_applies_the_rules_to_the_workspace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from posttrain.tracking.registry import promotion_verdict

    data = report({"pretrain": {"add": items(500, 5)}, "grpo": {"add": BASE}, "merge": {"add": flip(BASE, lose=80)}},
                  chain={"merge": ["grpo"], "grpo": ["pretrain"]})  # fmt: skip
    layout = Layout(tmp_path)
    layout.metrics("eval").parent.mkdir(parents=True)
    layout.metrics("eval").write_text(data.model_dump_json())
    result = promotion_verdict(tiny_params(), layout.root)
    assert not result.promoted and result.status == "refuse" and "not_worse_than.grpo.add" in result.reason
    assert "[FAIL] not_worse_than.grpo.add" in capsys.readouterr().out
