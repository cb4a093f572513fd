"""Registry, evaluation scores on versions, gated promotion, force, rollback and loading the champion,
against a temporary SQLite store with tiny real models (helpers from tests/test_tracking.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.tracking import (
    client_for,
    make_model,
    make_params,
    make_project,
    record,
    score,
    write_eval,
    write_stage_metrics,
)

from posttrain.config import Params
from posttrain.layout import Layout

NAME = "posttrain-merge"
# The default recipe's gates (configs/tiny.yaml has none).
GATES = {"min_exact_match": {"add": 0.5}, "max_forgetting": {"add": 0.2}}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("POSTTRAIN_PIPELINE_RUN_ID", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def new_candidate(layout: Layout, params: Params, seed: int, add: float, add3: float, forgetting: float = 0.01) -> str:
    """Train-stage stand-ins: a new merge model, recorded, then evaluated with the given scores."""
    make_model(layout, "merge", seed=seed)
    write_stage_metrics(layout, "merge")
    version = record("merge", params, layout).model_version
    write_eval(
        layout,
        {"merge": {"add": score(add), "add3": score(add3), "rev": score(0.9)}},
        {"merge": {"add": forgetting, "rev": 0.0}},
    )
    record("evaluate", params, layout, model=False)
    return version


def aliases(params: Params) -> dict[str, str]:
    return {alias: str(v) for alias, v in client_for(params).get_registered_model(NAME).aliases.items()}


@pytest.fixture()
def project(tmp_path: Path) -> tuple[Layout, Params]:
    return make_project(tmp_path), make_params(tmp_path, promotion=GATES)


def test_evaluation_scores_land_on_the_version_and_its_card(project: tuple[Layout, Params]) -> None:
    layout, params = project
    version = new_candidate(layout, params, seed=11, add=0.8, add3=0.4)
    mv = client_for(params).get_model_version(NAME, version)
    scores = json.loads(mv.tags["posttrain.eval"])
    assert scores["exact_match"]["add3"] == score(0.4)
    assert scores["forgetting"]["add"] == 0.01
    assert mv.tags["posttrain.eval.add.exact_match"] == "0.8000 [0.7800, 0.8200] n=500"
    assert "| add3 | 0.400 | [0.380, 0.420] | 500 |" in mv.description  # the card shows scores with CIs
    assert f"models:/{NAME}/{version}" in mv.description
    run = client_for(params).get_run(json.loads(mv.tags["posttrain.eval"])["run_id"])
    assert run.data.metrics["merge.add3.exact_match"] == 0.4  # eval.json's flat summary on the evaluate run
    assert not any(key.startswith("models.") for key in run.data.metrics)
    assert aliases(params) == {"candidate": version}


def test_promotion_lifecycle(project: tuple[Layout, Params], capsys: pytest.CaptureFixture[str]) -> None:
    from posttrain.tracking import registry

    layout, params = project
    root = layout.root
    client = client_for(params)
    v1 = new_candidate(layout, params, seed=21, add=0.80, add3=0.40)

    first = registry.promote(params, root)
    assert first.promoted and first.changed and aliases(params) == {"candidate": v1, "champion": v1}
    again = registry.promote(params, root)  # idempotent
    assert not again.changed and aliases(params) == {"candidate": v1, "champion": v1}

    # A planted bad candidate: add below the 0.5 minimum, forgetting above 0.2.
    v2 = new_candidate(layout, params, seed=22, add=0.30, add3=0.60, forgetting=0.5)
    capsys.readouterr()
    refused = registry.promote(params, root)
    assert not refused.promoted and aliases(params) == {"candidate": v2, "champion": v1}
    assert "NOT promoted" in capsys.readouterr().out
    tags = client.get_model_version(NAME, v2).tags
    assert tags["posttrain.promotion.status"] == "refused"
    assert (
        "min_exact_match.add" in tags["posttrain.promotion.reason"]
        and "max_forgetting.add" in tags["posttrain.promotion.reason"]
    )
    before = client.get_model_version(NAME, v2)
    assert not registry.promote(params, root).changed  # refusing again changes nothing
    assert client.get_model_version(NAME, v2).last_updated_timestamp == before.last_updated_timestamp

    with pytest.raises(registry.PromotionError, match="reason"):
        registry.promote(params, root, version=v2, force=True)
    forced = registry.promote(params, root, version=v2, force=True, reason="incident 42: ship the hotfix")
    assert forced.forced and aliases(params) == {"candidate": v2, "champion": v2, "previous-champion": v1}
    tags = client.get_model_version(NAME, v2).tags
    assert tags["posttrain.promotion.forced"] == "true"
    assert tags["posttrain.promotion.reason"] == "incident 42: ship the hotfix"

    rolled = registry.rollback(params, root)
    assert rolled.champion_after == v1 and aliases(params)["champion"] == v1
    assert client.get_model_version(NAME, v2).tags["posttrain.promotion.status"] == "rolled-back"
    assert not registry.promote(params, root).promoted  # a rolled-back candidate needs force again
    with pytest.raises(registry.PromotionError, match="no previous champion"):
        registry.rollback(params, root)

    # A good candidate, clearly better on add3 than the champion (CIs do not overlap).
    v3 = new_candidate(layout, params, seed=23, add=0.85, add3=0.55)
    good = registry.promote(params, root)
    assert good.promoted and not good.forced
    assert aliases(params) == {"candidate": v3, "champion": v3, "previous-champion": v1}
    assert client.get_model_version(NAME, v3).tags["posttrain.promotion.previous_champion"] == v1

    state = registry.show(params, root)
    merge = next(m for m in state["models"] if m["name"] == NAME)
    assert merge["aliases"] == {"candidate": v3, "champion": v3, "previous-champion": v1}
    assert [v["status"] for v in merge["versions"]] == ["replaced by version 3", "refused", "champion"]
    assert client.get_model_version(NAME, v2).tags["posttrain.rolled_back"] == "true"  # outlives the status


def test_candidate_within_noise_of_the_champion_is_refused(project: tuple[Layout, Params]) -> None:
    from posttrain.tracking import registry

    layout, params = project
    v1 = new_candidate(layout, params, seed=31, add=0.80, add3=0.50)
    registry.promote(params, layout.root)
    v2 = new_candidate(layout, params, seed=32, add=0.80, add3=0.52)  # +0.02 with +-0.02 intervals
    result = registry.promote(params, layout.root)
    assert not result.promoted and aliases(params)["champion"] == v1
    gate = next(g for g in result.gates if g.name == "beats_champion.add3")
    assert not gate.passed and "CI lower end" in gate.detail
    assert v2 != v1


def test_unevaluated_candidate_is_refused(project: tuple[Layout, Params]) -> None:
    from posttrain.tracking import registry

    layout, params = project
    make_model(layout, "merge", seed=41)
    write_stage_metrics(layout, "merge")
    record("merge", params, layout)
    result = registry.promote(params, layout.root)
    assert not result.promoted and "evaluate" in result.reason
    assert "champion" not in aliases(params)


def test_champion_loads_by_alias_and_generates_text(project: tuple[Layout, Params]) -> None:
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.tracking import registry

    layout, params = project
    new_candidate(layout, params, seed=51, add=0.9, add3=0.5)
    registry.promote(params, layout.root)
    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    mlflow.set_registry_uri(params.tracking.tracking_uri)
    generate = mlflow.transformers.load_model(f"models:/{NAME}@champion")
    text = generate("12+34=", max_new_tokens=4, min_new_tokens=4, do_sample=False)[0]["generated_text"]
    # The same greedy continuation as the model folder the champion was registered from.
    source = layout.root / "sources" / "merge-51"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    ids = tokenizer("12+34=", return_tensors="pt").input_ids
    expected = tokenizer.decode(
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0], skip_special_tokens=True
    )
    assert text.startswith("12+34=") and len(text) > len("12+34=")
    assert text == expected
    # The pyfunc flavour works too, with generation settings at predict time.
    predicted = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(["12+34="], params={"max_new_tokens": 2})
    assert isinstance(predicted[0], str) and predicted[0]


def test_serving_load_checks_the_chat_template_fingerprint(project: tuple[Layout, Params]) -> None:
    import mlflow

    from posttrain.errors import StageError
    from posttrain.models.chat_template import LINEAGE_KEY, fingerprint
    from posttrain.tracking import registry
    from posttrain.tracking.client import TAG

    layout, params = project
    version = new_candidate(layout, params, seed=61, add=0.9, add3=0.5)
    registry.promote(params, layout.root)
    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    mlflow.set_registry_uri(params.tracking.tracking_uri)
    client = client_for(params)
    recorded = client.get_model_version(NAME, version).tags[TAG + LINEAGE_KEY]
    generator = registry.load_registered_model(f"models:/{NAME}@champion")
    assert fingerprint(generator.tokenizer) == recorded
    assert generator("12+34=", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("12+34=")
    # A version whose recorded template is not the one its tokenizer carries is refused, naming both.
    client.set_model_version_tag(NAME, version, TAG + LINEAGE_KEY, "f" * 64)
    with pytest.raises(StageError, match=r"chat template mismatch: .*champion.*ffffffffffffffff"):
        registry.load_registered_model(f"models:/{NAME}@champion")


def test_gate_rule_on_scores_without_mlflow(tmp_path: Path) -> None:
    from posttrain.tracking.registry import check_gates

    params = make_params(tmp_path, promotion={**GATES, "min_improvement": 0.05})
    champion = {"exact_match": {"add3": score(0.50, 0.02)}}

    def gates(add3: dict[str, Any]) -> dict[str, bool]:
        candidate = {"exact_match": {"add": score(0.9), "add3": add3}, "forgetting": {"add": 0.0}}
        return {g.name: g.passed for g in check_gates(params, candidate, champion, "1")}

    # improvement 0.10, half-widths 0.02 and 0.02: lower end 0.10 - 0.028 = 0.072 > 0.05
    assert gates(score(0.60, 0.02))["beats_champion.add3"]
    # improvement 0.10 with a wide candidate interval: 0.10 - sqrt(0.06^2 + 0.02^2) = 0.037 < 0.05
    assert not gates(score(0.60, 0.06))["beats_champion.add3"]
    assert check_gates(params, {"exact_match": {}, "forgetting": {}}, None, None)[-1].passed  # no champion yet
    missing = {g.name: g for g in check_gates(params, {"exact_match": {}, "forgetting": {}}, champion, "1")}
    assert not missing["min_exact_match.add"].passed and not missing["max_forgetting.add"].passed


def test_eval_parser_accepts_other_layouts() -> None:
    from posttrain.tracking.registry import parse_eval

    flat = parse_eval(
        {"merge": {"add": {"mean": 0.5, "ci": [0.4, 0.6], "n": 10}}, "forgetting": {"add": {"merge": 0.1}}}
    )
    assert flat["merge"]["exact_match"]["add"] == {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 10}
    assert flat["merge"]["forgetting"] == {"add": 0.1}
    listed = parse_eval(
        {
            "results": [{"model": "sft", "scores": {"rev": {"exact_match": 0.7}}, "content_hash": "abc"}],
            "forgetting": {"models": ["sft"], "domains": ["rev"], "values": [[0.05]]},
        }
    )
    assert listed["sft"]["exact_match"]["rev"]["mean"] == 0.7 and listed["sft"]["content_hash"] == "abc"
    assert listed["sft"]["forgetting"] == {"rev": 0.05}


def test_candidate_worse_than_its_parent_is_refused(
    project: tuple[Layout, Params], capsys: pytest.CaptureFixture[str]
) -> None:
    from posttrain.tracking import registry

    layout, params = project
    make_model(layout, "grpo", seed=51)
    write_stage_metrics(layout, "grpo")
    record("grpo", params, layout)
    make_model(layout, "merge", seed=52, parents=("grpo",))
    write_stage_metrics(layout, "merge")
    record("merge", params, layout)
    # The figures: the merge passes min_exact_match.add and forgetting but lost add3 to grpo.
    write_eval(
        layout,
        {"grpo": {"add": score(0.938), "add3": score(0.52)}, "merge": {"add": score(0.93), "add3": score(0.068)}},
        {"merge": {"add": 0.01}},
    )
    record("evaluate", params, layout, model=False)
    result = registry.promote(params, layout.root)
    assert not result.promoted and "champion" not in aliases(params)
    failed = [g for g in result.gates if not g.passed]
    assert [g.name for g in failed] == ["not_worse_than.grpo.add3"]
    out = capsys.readouterr().out
    assert "candidate: 'merge'" in out and "not_worse_than.grpo.add: parent 'grpo': add: candidate 0.9300" in out
    assert "parent 'grpo'" in failed[0].detail and "add3" in failed[0].detail
