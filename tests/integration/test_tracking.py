"""MLflow tracking against a temporary SQLite store (never the project's mlflow.db), with tiny real
model folders: parent/child runs, params, step series, lineage tags, registry versions, fail-fast on
an unreachable server, SQLite lock retries and secret redaction.

Helpers (shared with test_registry.py): tests/helpers/tracking.py.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.tracking import (
    client_for,
    make_model,
    make_params,
    make_project,
    record,
    write_stage_metrics,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("POSTTRAIN_PIPELINE_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------- a small recorded pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("POSTTRAIN_PIPELINE_RUN_ID", raising=False)
    root = tmp_path_factory.mktemp("project")
    layout = make_project(root)
    params = make_params(root)
    (layout.artifacts / "metrics").mkdir(parents=True, exist_ok=True)
    layout.metrics("prepare").write_text(json.dumps({"items": {"add": 100}, "seconds": 0.5}))
    layout.plots.mkdir(parents=True, exist_ok=True)
    (layout.plots / "sft_loss.png").write_bytes(b"\x89PNG fake plot bytes")
    records = {"prepare": record("prepare", params, layout, model=False)}
    make_model(layout, "pretrain", seed=1)
    write_stage_metrics(layout, "pretrain")
    records["pretrain"] = record("pretrain", params, layout)
    make_model(layout, "sft", seed=2, parents=("pretrain",))
    write_stage_metrics(layout, "sft")
    records["sft"] = record("sft", params, layout)
    yield {"root": root, "layout": layout, "params": params, "records": records}
    mp.undo()


def test_one_parent_run_and_a_child_per_stage(pipeline: dict[str, Any]) -> None:
    client, records = client_for(pipeline["params"]), pipeline["records"]
    parents = {r.parent_run_id for r in records.values()}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["posttrain.kind"] == "pipeline"
    assert parent.data.tags["posttrain.pipeline_key"].startswith("git:nogit/params:")
    assert parent.data.params["tracking.experiment"] == "posttrain"  # the whole params file on the parent
    for stage, rec in records.items():
        run = client.get_run(rec.run_id)
        assert run.info.run_name == stage
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == rec.parent_run_id
        assert run.data.tags["posttrain.dvc_stage"] == stage
        assert run.data.metrics["stage_seconds"] == 12.5


def test_child_run_has_stage_params_metrics_series_and_artifacts(pipeline: dict[str, Any]) -> None:
    client = client_for(pipeline["params"])
    run = client.get_run(pipeline["records"]["sft"].run_id)
    # Exactly the params keys dvc.yaml declares for the stage, flattened.
    assert run.data.params["sft.trainer.learning_rate"] == "0.001"
    assert run.data.params["seed"] == "1234"
    assert run.data.params["compute.device"] == "auto"
    # ...including data.domains (continual evaluation reads every domain), and nothing undeclared.
    assert any(key.startswith("data.domains.") for key in run.data.params)
    assert not any(
        key.startswith(("dpo.", "data.split", "data.decontamination", "tracking.")) for key in run.data.params
    )
    assert run.data.metrics["train_loss"] == 1.6
    assert run.data.metrics["tokens_per_second"] == 1234.5
    assert run.data.metrics["from_result"] == 1.0
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == [
        (10, 2.0),
        (20, 1.75),
        (30, 1.5),
        (40, 1.25),
    ]
    continual = client.get_metric_history(run.info.run_id, "continual_eval/add/exact_match")
    assert sorted((m.step, m.value) for m in continual) == [(20, 0.25), (40, 0.5)]
    artifacts = {
        a.path for folder in ("metrics", "plots", "lineage") for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {"metrics/sft.json", "plots/sft_loss.png", "lineage/lineage.json"} <= artifacts


def test_child_run_carries_lineage_tags(pipeline: dict[str, Any]) -> None:
    client, layout = client_for(pipeline["params"]), pipeline["layout"]
    lineage = json.loads((layout.model("sft") / "lineage.json").read_text())
    tags = client.get_run(pipeline["records"]["sft"].run_id).data.tags
    assert tags["posttrain.content_hash"] == lineage["content_hash"]
    assert tags["posttrain.params_hash"] == lineage["params_hash"]
    assert tags["posttrain.data_manifest_hash"] == lineage["data_manifest_hash"] is not None
    assert tags["posttrain.git_commit"] == str(lineage["git"]["commit"])
    assert tags["posttrain.git_dirty"] == str(lineage["git"]["dirty"])
    assert tags["posttrain.version.transformers"] == lineage["versions"]["transformers"]
    assert tags["posttrain.input_models"] == "posttrain/1 (pretrain)"  # the parent model and its registry version
    assert tags["posttrain.registered_model"] == "posttrain"
    assert tags["posttrain.registered_version"] == "2"
    prepare_tags = client.get_run(pipeline["records"]["prepare"].run_id).data.tags
    assert "posttrain.registered_model" not in prepare_tags  # no model, no version


def test_every_model_stage_gets_a_registry_version_with_lineage(pipeline: dict[str, Any]) -> None:
    client, layout = client_for(pipeline["params"]), pipeline["layout"]
    for stage in ("pretrain", "sft"):
        rec = pipeline["records"][stage]
        version = client.get_model_version("posttrain", rec.model_version)
        assert version.tags["posttrain.stage"] == stage
        lineage = json.loads((layout.model(stage) / "lineage.json").read_text())
        assert version.run_id == rec.run_id
        assert version.tags["posttrain.content_hash"] == lineage["content_hash"]
        assert version.tags["posttrain.data_manifest_hash"] == lineage["data_manifest_hash"]
        assert "## Lineage" in version.description and lineage["content_hash"][:16] in version.description
    sft = client.get_model_version("posttrain", pipeline["records"]["sft"].model_version)
    assert sft.tags["posttrain.stages"] == "pretrain > sft"
    assert sft.tags["posttrain.input_models"] == "posttrain/1 (pretrain)"


def test_same_model_content_is_not_registered_twice(pipeline: dict[str, Any]) -> None:
    again = record("sft", pipeline["params"], pipeline["layout"])
    assert again.model_version == pipeline["records"]["sft"].model_version
    versions = client_for(pipeline["params"]).search_model_versions("name = 'posttrain'")
    assert [v.tags["posttrain.stage"] for v in versions].count("sft") == 1


def test_flow_key_groups_stages_under_one_parent(pipeline: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain.tracking import runs

    params, layout = pipeline["params"], pipeline["layout"]
    parent_id = runs.start_pipeline_run(params, layout.root, key="flow-run-123")
    monkeypatch.setenv("POSTTRAIN_PIPELINE_RUN_ID", "flow-run-123")
    first = record("prepare", params, layout, model=False)
    monkeypatch.setenv("POSTTRAIN_PIPELINE_RUN_ID", parent_id)  # the MLflow run id works as well
    second = record("prepare", params, layout, model=False)
    assert first.parent_run_id == second.parent_run_id == parent_id
    assert parent_id != pipeline["records"]["prepare"].parent_run_id


def test_unreachable_server_fails_fast_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain.errors import TrackingError
    from posttrain.tracking.client import WAIT_ENV, check_tracking_server

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    params = make_params(tmp_path, tracking={"tracking_uri": f"http://bob:hunter2@127.0.0.1:{port}"})
    layout = make_project(tmp_path)
    started = time.perf_counter()
    with pytest.raises(TrackingError) as caught:
        check_tracking_server(params, tmp_path)
    assert time.perf_counter() - started < 5
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "cannot be reached" in message and "tracking.tracking_uri" in message
    assert "hunter2" not in message
    # After the stage, recording waits for the server (a restart must not lose the training), within bounds.
    monkeypatch.setenv(WAIT_ENV, "3")
    started = time.perf_counter()
    with pytest.raises(TrackingError) as caught:  # record_stage checks too, before writing anything
        record("prepare", params, layout, model=False)
    assert 3 <= time.perf_counter() - started < 3 + 8
    message = str(caught.value)
    assert message.startswith("the stage finished, but MLflow tracking server") and f"127.0.0.1:{port}" in message
    assert f"{WAIT_ENV}=3" in message and "dvc repro prepare" in message and "hunter2" not in message


def test_reachable_server_passes_the_check(tmp_path: Path) -> None:
    from posttrain.tracking.client import check_tracking_server

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        assert check_tracking_server(make_params(tmp_path, tracking={"tracking_uri": uri}), tmp_path) == uri
    finally:
        server.shutdown()
        server.server_close()


def test_secrets_in_the_tracking_uri_never_reach_logged_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain.tracking import client as tracking_client

    layout = make_project(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    secret_uri = "https://alice:s3cretpass@mlflow.example.com"
    params = make_params(
        tmp_path, tracking={"tracking_uri": secret_uri}, model={"base": "https://hf:hf_s3crettoken@hub.example.com/m"}
    )
    # The store is local; the params still carry the secret-bearing URI the run would have used.
    monkeypatch.setattr(tracking_client, "resolve_tracking_uri", lambda p, r: (store, "test"))
    make_model(layout, "pretrain", seed=3)
    write_stage_metrics(layout, "pretrain")
    rec = record("pretrain", params, layout)
    client = client_for(make_params(tmp_path))
    for run_id in (rec.run_id, rec.parent_run_id):
        data = client.get_run(run_id).data
        logged = json.dumps([data.params, data.tags])
        assert "s3cretpass" not in logged and "hf_s3crettoken" not in logged
    parent_params = client.get_run(rec.parent_run_id).data.params
    assert parent_params["tracking.tracking_uri"] == "https://alice:***@mlflow.example.com"
    assert client.get_run(rec.run_id).data.params["model.base"] == "https://hf:***@hub.example.com/m"


def test_locked_sqlite_is_retried_with_backoff() -> None:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    from posttrain.tracking.client import retry_locked

    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.perf_counter())
        if len(calls) < 3:
            error = OperationalError("INSERT", {}, Exception("database is locked"))
            raise MlflowException(f"(sqlite3.OperationalError) {error}")
        return "written"

    assert retry_locked(flaky, delay=0.01) == "written"
    assert len(calls) == 3 and calls[2] - calls[1] >= calls[1] - calls[0]  # waits grow

    def broken() -> None:
        calls.append(0.0)
        raise MlflowException("no such table: runs")

    calls.clear()
    with pytest.raises(MlflowException, match="no such table"):
        retry_locked(broken, delay=0.01)
    assert len(calls) == 1  # other errors are not retried

    def always_locked() -> None:
        raise MlflowException("database is locked")

    with pytest.raises(MlflowException, match="locked"):
        retry_locked(always_locked, attempts=3, delay=0.001)


def test_series_readers_accept_the_shapes_stages_write() -> None:
    from posttrain.tracking.runs import scalar_metrics, series_metrics

    metrics = {
        "log_history": [{"loss": 1.0, "step": 5}, {"eval_loss": 0.5, "step": 5, "note": "x"}],
        "continual_eval": {
            "add": [[10, 0.1], [20, 0.2]],
            "by_step": {"steps": [10, 20], "exact_match": [0.3, 0.4]},
            "rows": [{"step": 10, "exact_match": {"sub": 0.7}}],
        },
        "nested": {"a": 1, "flag": True, "name": "x"},
        # Trajectories of the GRPO curriculum and of online mixing: steps of MLflow series, not scalars.
        "curriculum_trajectory": [{"step": 3, "p": {"add/d1": 0.25}}],
        "mixing_trajectory": [{"step": 0, "p": {"add": 0.6}, "interaction": {"add": {"rev": 0.1}}}],
    }
    points = set(series_metrics(metrics))
    assert {("curriculum_trajectory/p/add/d1", 0.25, 3), ("mixing_trajectory/p/add", 0.6, 0)} <= points
    assert ("mixing_trajectory/interaction/add/rev", 0.1, 0) in points
    assert {("train/loss", 1.0, 5), ("train/eval_loss", 0.5, 5)} <= points
    assert {("continual_eval/add", 0.1, 10), ("continual_eval/add", 0.2, 20)} <= points
    assert {("continual_eval/by_step/exact_match", 0.3, 10), ("continual_eval/rows/exact_match/sub", 0.7, 10)} <= points
    assert scalar_metrics(metrics) == {"nested.a": 1.0}


def test_tracking_overhead_per_stage_is_small(pipeline: dict[str, Any]) -> None:
    """What MLflow adds to a model stage (store already created): run, params, metrics, artifacts,
    log_model of a ~1M-parameter model and registration."""
    layout, params = pipeline["layout"], pipeline["params"]
    make_model(layout, "dpo", seed=4, parents=("sft",))
    write_stage_metrics(layout, "dpo")
    rec = record("dpo", params, layout)
    print(f"\nMLflow overhead for a model stage: {rec.seconds:.2f} s")
    assert client_for(params).get_run(rec.run_id).data.metrics["tracking_seconds"] == pytest.approx(
        rec.seconds, abs=0.5
    )
    assert rec.seconds < 15
