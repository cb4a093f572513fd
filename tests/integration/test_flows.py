"""The Prefect flows run the toy DVC project exactly as `dvc repro` would, and the continual flow ingests data.

Prefect is isolated: its home and database live in a temporary folder (prefect_test_harness starts
one local server on 127.0.0.1 for the module and stops it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fixtures.toy_dvc import make_toy_project, toy_env

_HOME = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_HOME"] = _HOME  # before prefect is imported: profiles and local storage go here
os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{_HOME}/prefect.db"

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.continual import continual_flow, read_state  # noqa: E402
from flows.pipeline import pipeline_flow  # noqa: E402
from posttrain.config import load_params  # noqa: E402
from posttrain.pipeline import dag  # noqa: E402

PROMOTE_CALLS: list[tuple[object, Path]] = []


def record_promotion(params: object, root: Path) -> str:
    """Stands in for posttrain.tracking.registry.promote: records that promotion ran, with what."""
    PROMOTE_CALLS.append((params, root))
    return "promoted"


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=180):
        yield
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_server: None) -> Path:
    monkeypatch.setenv("PATH", toy_env()["PATH"])
    return make_toy_project(tmp_path / "toy")


def outputs(root: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((root / "out").glob("*.txt"))}


def locked_outs(root: Path) -> dict[str, list]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {stage: sorted((o["path"], o["md5"]) for o in entry.get("outs", [])) for stage, entry in lock.items()}


def plant_failure(root: Path, stage: str) -> None:
    """Replace a stage's script with one that fails the way posttrain.pipeline.entry reports errors."""
    (root / "toy" / f"{stage}.py").write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "with Path('attempts.txt').open('a') as f:\n"
        "    f.write('x')\n"
        "print('some progress output')\n"
        f"print('error: stage {stage}: planted failure in row 3', file=sys.stderr)\n"
        "sys.exit(1)\n"
    )


def test_flow_matches_dvc_repro_and_reruns_nothing_when_unchanged(toy: Path, tmp_path: Path) -> None:
    reference = make_toy_project(tmp_path / "reference")
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=reference, check=True, env=toy_env())

    first = pipeline_flow(str(toy))
    assert first == {"source": "ran", "left": "ran", "right": "ran", "join": "ran"}
    assert outputs(toy) == outputs(reference) and len(outputs(toy)) == 4
    assert locked_outs(toy) == locked_outs(reference)

    lock_before = (toy / "dvc.lock").read_text()
    assert pipeline_flow(str(toy)) == dict.fromkeys(["source", "left", "right", "join"], "cached")
    assert (toy / "dvc.lock").read_text() == lock_before


def test_flow_tasks_follow_dvcs_graph(toy: Path) -> None:
    state = pipeline_flow(str(toy), return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    by_id = {run.id: run.name for run in runs}
    edges = {(by_id[i.id], run.name) for run in runs for i in run.task_inputs.get("wait_for", [])}
    assert {run.name for run in runs} == {"source", "left", "right", "join"}
    assert edges == {(up, stage) for stage, ups in dag.stage_graph(toy).items() for up in ups}


def test_failing_stage_stops_descendants_and_surfaces_its_message(toy: Path) -> None:
    assert pipeline_flow(str(toy))["join"] == "ran"
    join_before = (toy / "out" / "join.txt").read_text()
    plant_failure(toy, "right")
    dag.apply_overrides(toy, ["orchestration.default_retries=1"])  # one retry: two attempts in all

    state = pipeline_flow(str(toy), return_state=True)
    assert state.is_failed()
    assert state.message.startswith("error: stage right: planted failure in row 3")
    assert "`dvc repro --single-item right` exited 255" in state.message  # DVC's code for a failed stage
    assert (toy / "attempts.txt").read_text() == "xx"
    assert (toy / "out" / "join.txt").read_text() == join_before  # join did not run
    assert set(dag.stale_stages(toy)) == {"right", "join"}


def test_overrides_land_in_params_and_dvc_lock(toy: Path) -> None:
    assert pipeline_flow(str(toy), overrides=["seed=5"], stages=["left"]) == {"source": "ran", "left": "ran"}
    assert load_params(toy / "params.yaml").seed == 5
    lock = yaml.safe_load((toy / "dvc.lock").read_text())["stages"]
    assert lock["source"]["params"]["params.yaml"]["seed"] == 5
    assert (toy / "out" / "source.txt").read_text().startswith("seed=5\n")
    assert set(dag.stale_stages(toy)) == {"right", "join"}  # not selected: still to do


def test_bad_override_fails_before_any_stage_runs(toy: Path) -> None:
    state = pipeline_flow(str(toy), overrides=["orchestration.max_parallel=-1"], return_state=True)
    assert state.is_failed() and "orchestration.max_parallel" in state.message
    assert not (toy / "out").exists()


def test_continual_flow_waits_for_data_then_ingests_and_runs_downstream(toy: Path) -> None:
    promote = "test_flows:record_promotion"
    PROMOTE_CALLS.clear()
    pipeline_flow(str(toy))
    params_before = (toy / "params.yaml").read_text()

    assert continual_flow(str(toy), promote=promote) == {"new_files": [], "ran": False}
    assert (toy / "params.yaml").read_text() == params_before and not PROMOTE_CALLS

    incoming = toy / "incoming"
    incoming.mkdir()
    (incoming / "batch1.csv").write_text("prompt,answer\n1+1=,2\n2+2=,4\n")
    (incoming / "notes.txt").write_text("not data")
    result = continual_flow(str(toy), promote=promote)
    assert result["new_files"] == ["batch1.csv"] and result["promotion"] == "promoted"
    assert result["stages"] == dict.fromkeys(["source", "left", "right", "join"], "ran")
    params = load_params(toy / "params.yaml")
    domain = params.data.domains["fresh"]
    assert domain.kind == "file" and domain.path == f"data/continual/fresh/{result['version']}.jsonl"
    assert params.mixtures["cpt"].weights["fresh"] == 1.0
    assert (toy / "data" / "continual" / "fresh.dvc").is_file()  # versioned with `dvc add`
    assert "domain=fresh kind=file" in (toy / "out" / "source.txt").read_text()
    assert len(PROMOTE_CALLS) == 1 and PROMOTE_CALLS[0][1] == toy.resolve()
    assert dag.stale_stages(toy) == {}

    # The same files again: nothing new. A second batch: appended, a new version, downstream reruns.
    assert continual_flow(str(toy), promote=promote)["ran"] is False
    (incoming / "batch2.jsonl").write_text('{"prompt": "3+3=", "answer": "6"}\n')
    second = continual_flow(str(toy), promote=promote)
    assert second["new_files"] == ["batch2.jsonl"] and second["version"] != result["version"]
    assert read_state(toy, params.orchestration.continual)["current"]["rows"] == 3
    assert len(list((toy / "data" / "continual" / "fresh").glob("*.jsonl"))) == 1
    # Every suffix the data layer reads is ingested (.ndjson and .pq were skipped as "no new data"), and a
    # conversation keeps its list of messages (it was turned into its Python repr).
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = [{"role": "user", "content": "4+4="}]
    (incoming / "batch3.ndjson").write_text(json.dumps({"prompt": chat, "answer": "8"}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": "5+5=", "answer": 10}]), incoming / "batch4.pq")
    third = continual_flow(str(toy), promote=promote)
    assert sorted(third["new_files"]) == ["batch3.ndjson", "batch4.pq"]
    stored = (toy / load_params(toy / "params.yaml").data.domains["fresh"].path).read_text().splitlines()
    rows = [json.loads(line) for line in stored]
    assert {"answer": "8", "prompt": chat} in rows and {"answer": "10", "prompt": "5+5="} in rows


def test_continual_failure_leaves_ingest_pending_and_next_run_finishes_it(toy: Path) -> None:
    (toy / "incoming").mkdir()
    (toy / "incoming" / "a.jsonl").write_text('{"text": "hello"}\n')
    original = (toy / "toy" / "join.py").read_text()
    plant_failure(toy, "join")
    state = continual_flow(str(toy), promote=None, return_state=True)
    assert state.is_failed() and state.message.startswith("error: stage join: planted failure")
    (toy / "toy" / "join.py").write_text(original)
    again = continual_flow(str(toy), promote=None)  # no new files, but the last ingest is unfinished
    assert again["ran"] is True and again["stages"]["join"] == "ran"
    assert continual_flow(str(toy), promote=None)["ran"] is False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.e2e
def test_deploy_creates_a_cron_deployment_on_a_local_server(tmp_path: Path) -> None:
    toy = make_toy_project(tmp_path / "toy")
    port = _free_port()
    home = tmp_path / "server-home"
    env = toy_env() | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
    }
    api = env["PREFECT_API_URL"]
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "prefect server did not start"
            time.sleep(1)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "posttrain.pipeline.cli",
                "deploy",
                "--root",
                str(toy),
                "--cron",
                "*/30 * * * *",
                "--pool",
                "toy-pool",
            ],
            env=env,
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
            timeout=180,
        )
        assert done.returncode == 0, done.stderr
        assert "cron '*/30 * * * *' on work pool 'toy-pool'" in done.stdout
        deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
        assert [d["name"] for d in deployments] == ["continual"]
        deployment = deployments[0]
        assert deployment["work_pool_name"] == "toy-pool"
        assert deployment["parameters"] == {"root": str(toy.resolve())}
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["*/30 * * * *"]
        assert httpx.get(f"{api}/work_pools/toy-pool", timeout=10).json()["type"] == "process"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
