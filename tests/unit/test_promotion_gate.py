"""The promotion candidate rule and the lineage gate, on eval.json and lineage.json files (no MLflow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.tiny import tiny_params

from posttrain.errors import ParamsError
from posttrain.layout import Layout
from posttrain.tracking.gate import ancestors, candidate_stage, lineage_gates


def score(mean: float, half: float = 0.02) -> dict[str, Any]:
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": 500}


def lineage(layout: Layout, stage: str, parents: list[str]) -> None:
    folder = layout.model(stage)
    folder.mkdir(parents=True, exist_ok=True)
    entries = [{"stage": p, "path": f"artifacts/models/{p}", "content_hash": f"hash-{p}"} for p in parents]
    (folder / "lineage.json").write_text(
        json.dumps({"stage": stage, "content_hash": f"hash-{stage}", "parents": entries})
    )


def eval_json(models: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    return {
        "models": {
            m: {"content_hash": f"hash-{m}", "domains": {d: {"exact_match": s} for d, s in per.items()}}
            for m, per in models.items()
        }
    }


@pytest.fixture()
def layout(tmp_path: Path) -> Layout:
    """pretrain > cpt > grpo, and merge of cpt and grpo (the issue's default recipe)."""
    layout = Layout(tmp_path)
    lineage(layout, "pretrain", [])
    lineage(layout, "cpt", ["pretrain"])
    lineage(layout, "grpo", ["cpt"])
    lineage(layout, "merge", ["cpt", "grpo", "pretrain"])
    return layout


def test_ancestors_are_transitive_and_listed_once(layout: Layout) -> None:
    lineage(layout, "merge", ["grpo"])  # pretrain and cpt only through grpo
    found = {a["stage"]: a["via"] for a in ancestors(layout, "merge")}
    assert found == {"grpo": "merge", "cpt": "grpo", "pretrain": "cpt"}


def test_candidate_worse_than_its_parent_is_refused_naming_parent_and_domain(layout: Layout) -> None:
    data = eval_json(
        {
            "pretrain": {"add": score(0.5), "add3": score(0.05)},
            "cpt": {"add": score(0.55), "add3": score(0.06)},
            "grpo": {"add": score(0.94), "add3": score(0.52)},
            "merge": {"add": score(0.93), "add3": score(0.07)},
        }
    )
    gates = lineage_gates(tiny_params(), layout, "merge", data)
    failed = [g for g in gates if not g.passed]
    assert [g.name for g in failed] == ["not_worse_than.grpo.add3"]
    assert "parent 'grpo'" in failed[0].detail and "add3" in failed[0].detail
    # add: 0.93 vs 0.94 is inside the two intervals (tolerance sqrt(2) x 0.02): not a regression
    assert next(g for g in gates if g.name == "not_worse_than.grpo.add").passed
    assert {g.name for g in gates} >= {"not_worse_than.cpt.add", "not_worse_than.pretrain.add3"}


def test_seed_spread_widens_the_tolerance(layout: Layout) -> None:
    data = eval_json({"grpo": {"add": score(0.90, 0.01)}, "merge": {"add": score(0.85, 0.01)}})
    params = tiny_params()
    assert not lineage_gates(params, layout, "merge", data)[0].passed  # -0.05 beyond 0.014
    gate = lineage_gates(params, layout, "merge", data, spread={"add": 0.05})[0]
    assert gate.passed and "seed spread 0.0500" in gate.detail


def test_stale_evaluation_of_an_ancestor_fails(layout: Layout) -> None:
    data = eval_json({"grpo": {"add": score(0.9)}, "merge": {"add": score(0.95)}})
    data["models"]["grpo"]["content_hash"] = "an-older-grpo"
    gate = lineage_gates(tiny_params(), layout, "merge", data)[0]
    assert not gate.passed and "rerun evaluate" in gate.detail


def test_lineage_domains_limit_the_gate(layout: Layout) -> None:
    data = eval_json({"grpo": {"add": score(0.9), "rev": score(0.9)}, "merge": {"add": score(0.9), "rev": score(0.1)}})
    params = tiny_params(promotion={"lineage_domains": ["add"]})
    assert [g.name for g in lineage_gates(params, layout, "merge", data)] == ["not_worse_than.grpo.add"]


def test_candidate_rules() -> None:
    data = eval_json({"sft": {"add": score(0.9), "rev": score(0.5)}, "merge": {"add": score(0.8), "rev": score(0.7)}})
    assert candidate_stage(tiny_params(), data) == ("merge", "promotion.final_stage")
    assert candidate_stage(tiny_params(promotion={"candidate": {"stage": "sft"}}), data)[0] == "sft"
    best = tiny_params(promotion={"candidate": {"best_of": ["sft", "merge"], "metric": "mean"}})
    assert candidate_stage(best, data)[0] == "merge"  # mean 0.75 vs 0.70
    on_add = tiny_params(promotion={"candidate": {"best_of": ["sft", "merge"], "metric": "add"}})
    stage, why = candidate_stage(on_add, data)
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


def test_verdict_without_tracking_applies_the_gates_to_the_files(
    layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    from posttrain.tracking.registry import gate_verdict

    data = eval_json(
        {"grpo": {"add": score(0.94), "add3": score(0.52)}, "merge": {"add": score(0.93), "add3": score(0.07)}}
    )
    layout.metrics("eval").parent.mkdir(parents=True)
    layout.metrics("eval").write_text(json.dumps(data))
    result = gate_verdict(tiny_params(), layout.root)
    assert not result.promoted and "not_worse_than.grpo.add3" in result.reason
    assert "[FAIL] not_worse_than.grpo.add3" in capsys.readouterr().out
