"""Remote services, for real on this machine: an MLflow tracking server started on 127.0.0.1 that a
`dvc repro` run tracks to (through MLFLOW_TRACKING_URI), and a DVC remote (a local directory) that
a model output is pushed to and pulled back from after the cache and the output are wiped.

One project copy and one `dvc repro pretrain` (prepare, mix, pretrain on the tiny recipe) serve
both checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.projects import make_project_copy, project_env, stages_run

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server at {url} not healthy after {timeout} s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:<free port>, SQLite backend, proxied artifacts; stopped afterwards."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", (folder / "artifacts").as_uri(),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    log = open(folder / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, process)
        yield url
    finally:
        # The server runs workers in its own process group: stop them all, then the log.
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _dvc(args: list[str], root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def tracked_project(tmp_path_factory, mlflow_server):
    root = make_project_copy(tmp_path_factory.mktemp("remotes"))
    env = {**project_env(root), "MLFLOW_TRACKING_URI": mlflow_server}
    done = _dvc(["repro", "pretrain"], root, env)
    assert stages_run(done.stdout) == ["prepare", "mix", "pretrain"], done.stdout
    return root, env


def test_stage_runs_are_tracked_on_the_mlflow_server(tracked_project, mlflow_server):
    from mlflow import MlflowClient

    root, _ = tracked_project
    assert not (root / "mlflow.db").exists()  # nothing went to the default local store
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = client.get_experiment_by_name("posttrain")
    runs = client.search_runs([experiment.experiment_id])
    stage_runs = {r.info.run_name: r for r in runs if r.data.tags.get("posttrain.kind") == "stage"}
    assert {"prepare", "mix", "pretrain"} <= set(stage_runs)
    pretrain = stage_runs["pretrain"]
    assert pretrain.info.status == "FINISHED" and pretrain.data.metrics["steps"] == 6
    lineage = json.loads((root / "artifacts" / "models" / "pretrain" / "lineage.json").read_text())
    # The lineage record went to the server's artifact store (proxied), and the model to its registry.
    local = client.download_artifacts(pretrain.info.run_id, "lineage/lineage.json", str(root / "downloaded"))
    assert json.loads(Path(local).read_text())["content_hash"] == lineage["content_hash"]
    versions = client.search_model_versions("name='posttrain'")
    assert [(v.run_id, v.tags["posttrain.stage"]) for v in versions] == [(pretrain.info.run_id, "pretrain")]


def test_dvc_remote_push_and_pull_restore_a_model_output(tracked_project, tmp_path):
    from posttrain.lineage import file_hashes, verify_model_folder

    root, env = tracked_project
    remote = tmp_path / "dvc-remote"
    _dvc(["remote", "add", "-d", "storage", str(remote)], root, env)
    _dvc(["push"], root, env)
    assert any(p.is_file() for p in remote.rglob("*"))
    model = root / "artifacts" / "models" / "pretrain"
    before = file_hashes(model)
    # A fresh machine: no cache, no outputs. Only the remote has the data.
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(model)
    _dvc(["pull", "pretrain"], root, env)
    assert file_hashes(model) == before
    verify_model_folder(model)
    status = _dvc(["status", "pretrain"], root, env)
    assert "changed" not in status.stdout, status.stdout
