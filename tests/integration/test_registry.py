"""The recipe's one registered model: versions per stage model, evaluation scores on versions, gated promotion of
one champion, force, rollback, the promotion lock, loading the champion and migrating an older store; against a
temporary SQLite store with tiny real models (helpers in tests/helpers/tracking.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

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

NAME = "posttrain"  # tracking.registered_model_prefix: the recipe's one registered model
# The default recipe's thresholds; these candidates have no evaluated base, so the learning check is off here
# (tests/unit/test_promotion_rules.py covers it).
GATES = {"min_exact_match": {"add": 0.5}, "max_forgetting": {"add": 0.2}, "require_learning": False}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("POSTTRAIN_PIPELINE_RUN_ID", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def new_model(layout: Layout, params: Params, stage: str, seed: int, parents: tuple[str, ...] = ()) -> str:
    """A stage's model written and recorded as its stage would (a version of the recipe's model)."""
    make_model(layout, stage, seed=seed, parents=parents)
    write_stage_metrics(layout, stage)
    return record(stage, params, layout).model_version


def evaluate(layout: Layout, params: Params, scores: dict[str, dict[str, float]], forgetting: float = 0.01) -> None:
    """eval.json with these exact-match means (+-0.02 intervals, 500 items), recorded as the evaluate run."""
    write_eval(
        layout,
        {stage: {d: score(m) for d, m in per.items()} for stage, per in scores.items()},
        {stage: {"add": forgetting} for stage in scores},
    )
    record("evaluate", params, layout, model=False)


def new_candidate(layout: Layout, params: Params, seed: int, add: float, add3: float, forgetting: float = 0.01) -> str:
    version = new_model(layout, params, "merge", seed)
    evaluate(layout, params, {"merge": {"add": add, "add3": add3, "rev": 0.9}}, forgetting)
    return version


def aliases(params: Params) -> dict[str, str]:
    return {alias: str(v) for alias, v in client_for(params).get_registered_model(NAME).aliases.items()}


def stage_of(params: Params, version: str) -> str:
    return client_for(params).get_model_version(NAME, version).tags["posttrain.stage"]


@pytest.fixture()
def project(tmp_path: Path) -> tuple[Layout, Params]:
    return make_project(tmp_path), make_params(tmp_path, promotion=GATES)


def test_every_stage_model_is_a_version_of_one_registered_model(project: tuple[Layout, Params]) -> None:
    layout, params = project
    sft = new_model(layout, params, "sft", seed=1)
    grpo = new_model(layout, params, "grpo", seed=2, parents=("sft",))
    assert [stage_of(params, sft), stage_of(params, grpo)] == ["sft", "grpo"]
    names = [m.name for m in client_for(params).search_registered_models()]
    assert names == [NAME]
    tags = client_for(params).get_model_version(NAME, grpo).tags
    assert tags["posttrain.input_models"] == f"{NAME}/{sft} (sft)" and tags["posttrain.stages"] == "sft > grpo"
    assert tags["posttrain.engine"] == "transformers" and tags["posttrain.variant"] == ""
    assert record("sft", params, layout).model_version == sft  # same stage, same content: same version


def test_evaluation_scores_land_on_the_version_and_its_card(project: tuple[Layout, Params]) -> None:
    layout, params = project
    version = new_candidate(layout, params, seed=11, add=0.8, add3=0.4)
    mv = client_for(params).get_model_version(NAME, version)
    scores = json.loads(mv.tags["posttrain.eval"])
    assert scores["exact_match"]["add3"] == score(0.4) and scores["engine"] == "hf" and scores["stage"] == "merge"
    assert scores["forgetting"]["add"] == 0.01
    assert mv.tags["posttrain.eval.add.exact_match"] == "0.8000 [0.7800, 0.8200] n=500"
    assert "| add3 | 0.400 | [0.380, 0.420] | 500 |" in mv.description  # the card shows scores with CIs
    assert f"models:/{NAME}/{version}" in mv.description
    run = client_for(params).get_run(scores["run_id"])
    assert run.data.metrics["merge.add3.exact_match"] == 0.4  # eval.json's flat summary on the evaluate run
    assert aliases(params) == {"candidate": version}  # the candidate is the version the rule picks


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
    assert not refused.promoted and refused.status == "refuse" and aliases(params) == {"candidate": v2, "champion": v1}
    assert "NOT promoted" in capsys.readouterr().out
    tags = client.get_model_version(NAME, v2).tags
    assert tags["posttrain.promotion.status"] == "refused"
    assert "min_exact_match.add" in tags["posttrain.promotion.reason"]
    assert "max_forgetting.add" in tags["posttrain.promotion.reason"]
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

    # A good candidate, clearly better on add3 than the champion (intervals far apart).
    v3 = new_candidate(layout, params, seed=23, add=0.85, add3=0.55)
    good = registry.promote(params, root)
    assert good.promoted and not good.forced
    assert aliases(params) == {"candidate": v3, "champion": v3, "previous-champion": v1}
    assert client.get_model_version(NAME, v3).tags["posttrain.promotion.previous_champion"] == v1

    state = registry.show(params, root)
    assert state["name"] == NAME and state["aliases"] == {"candidate": v3, "champion": v3, "previous-champion": v1}
    assert [v["status"] for v in state["versions"]] == ["replaced by version 3", "refused", "champion"]
    assert client.get_model_version(NAME, v2).tags["posttrain.rolled_back"] == "true"  # outlives the status


def test_a_candidate_within_noise_of_the_champion_is_inconclusive_and_not_promoted(
    project: tuple[Layout, Params],
) -> None:
    from posttrain.tracking import registry

    layout, params = project
    v1 = new_candidate(layout, params, seed=31, add=0.80, add3=0.50)
    registry.promote(params, layout.root)
    new_candidate(layout, params, seed=32, add=0.80, add3=0.52)  # +0.02 with +-0.02 intervals
    result = registry.promote(params, layout.root)
    assert not result.promoted and result.status == "inconclusive" and aliases(params)["champion"] == v1
    check = next(g for g in result.checks if g.name == "beats_champion.add3")
    assert check.status == "inconclusive" and f"champion v{v1} (merge)" in check.detail


def test_unevaluated_candidate_is_refused(project: tuple[Layout, Params]) -> None:
    from posttrain.tracking import registry

    layout, params = project
    version = new_model(layout, params, "merge", seed=41)
    result = registry.promote(params, layout.root, version=version)
    assert not result.promoted and "has no evaluation" in result.reason
    assert "champion" not in aliases(params)


def test_rollback_after_a_bad_grpo_promotion_restores_the_champion_of_any_stage(project: tuple[Layout, Params]) -> None:
    """Defect: rollback always acted on the final stage's model (merge): after a bad grpo promotion it demoted a
    merge version nobody asked about, or failed, and the bad grpo champion stayed."""
    from posttrain.tracking import registry

    layout, params = project
    merge = new_candidate(layout, params, seed=71, add=0.9, add3=0.5)
    assert registry.promote(params, layout.root).promoted
    grpo = new_model(layout, params, "grpo", seed=72)
    evaluate(layout, params, {"grpo": {"add": 0.9, "add3": 0.2}})
    assert registry.promote(params, layout.root, version=grpo, force=True, reason="bad call").promoted
    assert aliases(params)["champion"] == grpo and stage_of(params, grpo) == "grpo"
    rolled = registry.rollback(params, layout.root)
    assert aliases(params)["champion"] == merge and rolled.champion_before == grpo
    assert "('merge') is the champion again" in rolled.reason and "('grpo') demoted" in rolled.reason


def test_the_first_champion_of_a_stage_is_compared_with_the_served_model(project: tuple[Layout, Params]) -> None:
    """Defect: grpo's 'beats the champion' check passed as 'no champion yet' while a merge champion was served."""
    from posttrain.tracking import registry

    layout, params = project
    merge = new_candidate(layout, params, seed=81, add=0.9, add3=0.55)
    assert registry.promote(params, layout.root).promoted
    grpo = new_model(layout, params, "grpo", seed=82)
    evaluate(layout, params, {"grpo": {"add": 0.9, "add3": 0.40}})
    result = registry.promote(params, layout.root, version=grpo)
    check = next(g for g in result.checks if g.name == "beats_champion.add3")
    assert check.status == "fail" and f"champion v{merge} (merge)" in check.detail
    assert not result.promoted and aliases(params)["champion"] == merge


def test_promote_version_gates_that_versions_own_evaluation(project: tuple[Layout, Params]) -> None:
    """Defect: `promote --version N` scored the workspace's model from eval.json, not version N."""
    from posttrain.tracking import registry

    layout, params = project
    bad = new_candidate(layout, params, seed=91, add=0.30, add3=0.60)  # below min_exact_match.add
    good = new_candidate(layout, params, seed=92, add=0.90, add3=0.60)  # the workspace's eval.json is now this one
    result = registry.promote(params, layout.root, version=bad)
    assert not result.promoted and "min_exact_match.add" in result.reason and "0.3000" in result.reason
    assert registry.promote(params, layout.root, version=good).promoted


def test_a_second_promotion_waits_for_the_lock_and_names_the_holder(project: tuple[Layout, Params]) -> None:
    from posttrain.tracking import registry

    layout, params = project
    new_candidate(layout, params, seed=95, add=0.9, add3=0.5)
    client = client_for(params)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with registry.promotion_lock(client, NAME):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        with pytest.raises(registry.PromotionError, match=r"another promotion of 'posttrain' is in progress \(pid"):
            registry.promote(params, layout.root, wait_seconds=1.0)
    finally:
        release.set()
        holder.join()
    assert registry.promote(params, layout.root).promoted  # released: the lock model is gone
    assert [m.name for m in client.search_registered_models()] == [NAME]


def test_a_promotion_that_waited_while_another_moved_the_champion_refuses(project: tuple[Layout, Params]) -> None:
    """Two promotions at once: the one that waited decided against the old champion, so it is not applied."""
    from posttrain.tracking import registry

    layout, params = project
    other = new_model(layout, params, "grpo", seed=96)
    new_candidate(layout, params, seed=97, add=0.9, add3=0.5)
    client = client_for(params)
    held, outcome = threading.Event(), {}

    def promote() -> None:
        try:
            outcome["result"] = registry.promote(params, layout.root, wait_seconds=60)
        except registry.PromotionError as error:
            outcome["error"] = str(error)

    with registry.promotion_lock(client, NAME):
        waiting = threading.Thread(target=promote)
        waiting.start()
        held.wait(2)  # the waiting promotion has read "no champion" and is polling the lock
        client.set_registered_model_alias(NAME, "champion", other)  # what the first promotion did meanwhile
    waiting.join(60)
    assert "error" in outcome and f"another promotion made version {other} the champion" in outcome["error"]
    assert aliases(params)["champion"] == other


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


def test_candidate_worse_than_its_parent_is_refused(
    project: tuple[Layout, Params], capsys: pytest.CaptureFixture[str]
) -> None:
    from posttrain.tracking import registry

    layout, params = project
    new_model(layout, params, "grpo", seed=51)
    new_model(layout, params, "merge", seed=52, parents=("grpo",))
    # The merge passes min_exact_match.add and forgetting but lost add3 to grpo.
    evaluate(layout, params, {"grpo": {"add": 0.938, "add3": 0.52}, "merge": {"add": 0.93, "add3": 0.068}})
    result = registry.promote(params, layout.root)
    assert not result.promoted and "champion" not in aliases(params)
    failed = [g for g in result.checks if g.status == "fail"]
    assert [g.name for g in failed] == ["not_worse_than.grpo.add3"]
    out = capsys.readouterr().out
    assert "candidate: 'merge'" in out and "parent 'grpo' on add: difference -0.0080" in out
    assert "parent 'grpo' on add3" in failed[0].detail


def test_an_older_store_with_per_stage_models_is_refused_then_migrated(project: tuple[Layout, Params]) -> None:
    from posttrain.tracking import registry

    layout, params = project
    client = client_for(params)
    # What an older posttrain wrote: posttrain-sft and posttrain-merge, merge's v2 the champion after v1.
    new_model(layout, params, "sft", seed=1)
    new_model(layout, params, "merge", seed=2)
    new_model(layout, params, "merge", seed=3)
    for old, versions in (("posttrain-sft", ["1"]), ("posttrain-merge", ["2", "3"])):
        client.create_registered_model(old)
        for v in versions:
            source = client.get_model_version(NAME, v)
            client.create_model_version(old, source.source, run_id=source.run_id, tags=source.tags)
    client.set_registered_model_alias("posttrain-merge", "champion", "2")
    client.set_registered_model_alias("posttrain-sft", "champion", "1")
    client.set_registered_model_tag("posttrain-merge", "posttrain.champion_history", json.dumps(["1", "2"]))
    client.delete_registered_model(NAME)

    with pytest.raises(registry.PromotionError, match=r"per-stage registered models .*posttrain registry --migrate"):
        registry.promote(params, layout.root)
    moved = registry.migrate(params, layout.root)
    assert sorted(moved["versions"]) == ["posttrain-merge/1", "posttrain-merge/2", "posttrain-sft/1"]
    champion = aliases(params)["champion"]
    assert (
        champion == moved["versions"]["posttrain-merge/2"]
        and aliases(params)["previous-champion"] == moved["versions"]["posttrain-merge/1"]
    )
    tags = client.get_model_version(NAME, moved["versions"]["posttrain-sft/1"]).tags
    assert tags["posttrain.migrated_from"] == "posttrain-sft/1" and tags["posttrain.migrated_aliases"] == "champion"
    assert {k: str(v) for k, v in client.get_registered_model("posttrain-merge").aliases.items()} == {
        "champion": "2"
    }  # kept
    assert registry.show(params, layout.root, echo=False).get("legacy_models") is None
