"""The whole pipeline, for real: `dvc repro` of every stage on the tiny recipe in a copy of the project.

One module-scoped run is shared by the checks below (it takes a couple of minutes on 2 cores):
every stage runs its real trainer, DVC caches and reruns exactly what changed, and MLflow holds a
registry version for every model-producing stage.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from helpers.projects import make_project_copy, run, stages_run

MODEL_STAGES = ("pretrain", "cpt", "sft", "dpo", "grpo", "merge")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    root = make_project_copy(tmp_path_factory.mktemp("pipeline"))
    done = run(["dvc", "repro"], root)
    assert stages_run(done.stdout) == [
        "prepare",
        "mix",
        "pretrain",
        "cpt",
        "sft",
        "dpo",
        "grpo",
        "merge",
        "evaluate",
    ], done.stdout
    return root


def test_every_model_stage_writes_a_verified_model_folder(pipeline):
    from posttrain.lineage import verify_model_folder

    for stage in MODEL_STAGES:
        folder = pipeline / "artifacts" / "models" / stage
        assert (folder / "model.safetensors").is_file(), stage
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file(), stage
        lineage = verify_model_folder(folder)
        assert lineage["stage"] == stage
        assert lineage["git"]["commit"], stage
        metrics = json.loads((pipeline / "artifacts" / "metrics" / f"{stage}.json").read_text())
        assert metrics, stage
    # Each training stage names its parent and that parent's content hash.
    chain = ["pretrain", "cpt", "sft", "dpo", "grpo"]
    for parent, child in itertools.pairwise(chain):
        child_lineage = json.loads((pipeline / "artifacts" / "models" / child / "lineage.json").read_text())
        parent_lineage = json.loads((pipeline / "artifacts" / "models" / parent / "lineage.json").read_text())
        assert child_lineage["parents"][0]["content_hash"] == parent_lineage["content_hash"]
    merge_lineage = json.loads((pipeline / "artifacts" / "models" / "merge" / "lineage.json").read_text())
    assert {p["stage"] for p in merge_lineage["parents"]} >= {"cpt", "grpo"}


def test_evaluation_covers_every_model_and_dvc_reads_it(pipeline):
    evaluation = json.loads((pipeline / "artifacts" / "metrics" / "eval.json").read_text())
    text = json.dumps(evaluation)
    for stage in MODEL_STAGES:
        assert stage in text
    shown = run(["dvc", "metrics", "show", "--json"], pipeline)
    assert "eval.json" in shown.stdout


def test_no_change_repro_runs_nothing(pipeline):
    done = run(["dvc", "repro"], pipeline)
    assert stages_run(done.stdout) == []
    assert "up to date" in done.stdout


def test_dvc_exp_run_with_a_grpo_param_reruns_only_grpo_and_descendants(pipeline):
    # What a user does: commit the run, then try one parameter as an experiment.
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], pipeline)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "full run"], pipeline)
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    lower = params["grpo"]["trainer"]["learning_rate"] * 0.5
    done = run(["dvc", "exp", "run", "-n", "grpo-lr", "-S", f"grpo.trainer.learning_rate={lower}"], pipeline)
    assert stages_run(done.stdout) == ["grpo", "merge", "evaluate"]
    assert yaml.safe_load((pipeline / "params.yaml").read_text())["grpo"]["trainer"]["learning_rate"] == lower
    shown = json.loads(run(["dvc", "exp", "show", "--json"], pipeline).stdout)
    experiments = [e for commit in shown for e in (commit.get("experiments") or [])]
    assert any(e.get("name") == "grpo-lr" for e in experiments), json.dumps(shown)[:2000]


def test_registry_has_a_version_per_model_stage_and_a_candidate(pipeline):
    import mlflow
    from mlflow import MlflowClient

    # Both URIs explicitly: an earlier in-process test may have left MLflow's global registry URI on its own store.
    uri = f"sqlite:///{pipeline / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # One registered model for the recipe; a version per model stage, tagged with it.
    assert [model.name for model in client.search_registered_models()] == ["posttrain"]
    stages = {v.tags["posttrain.stage"] for v in client.search_model_versions("name = 'posttrain'")}
    assert set(MODEL_STAGES) <= stages, stages
    candidate = client.get_model_version_by_alias("posttrain", "candidate")
    assert candidate.tags["posttrain.stage"] in stages and candidate.tags.get("posttrain.eval")
