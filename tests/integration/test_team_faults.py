"""Faults on the team services, for real: each ends with nothing lost, or with a refusal that names what
failed and leaves the workspace consistent with dvc.lock.

One service set (`posttrain services up`) and one workspace of the tiny recipe for the module; each
test runs the next training stage while a service is killed (SIGKILL to its process group: a crash)
or restarted:

- the MLflow server killed during `pretrain` and started again: the stage waits, then records;
- the MLflow server killed during `cpt` and left down: the stage fails naming the URI, DVC locks
  nothing, and the rerun after the restart resumes the final checkpoint and records the same model;
- PostgreSQL restarted between stages: `posttrain run --stages sft` (Prefect and MLflow servers) works,
  every earlier run is still there;
- the S3 store killed during `dpo`: no registered version, no lock; after its restart the rerun registers;
- the Prefect server killed and restarted while the worker holds a run of the scheduled deployment.
The S3 fault runs late: moto keeps objects in memory and comes back empty (MinIO would not).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fixtures.toy_dvc import make_toy_project
from helpers.projects import make_project_copy, stages_run
from helpers.team import (
    CLI,
    Team,
    all_versions,
    dvc_clean,
    figure,
    lineage,
    ok,
    stage_runs,
    team_services,
    wait_for,
    wait_for_line,
)

from posttrain.pipeline import services
from posttrain.tracking.client import WAIT_ENV

pytestmark = [pytest.mark.team, pytest.mark.e2e]

DVC = [sys.executable, "-m", "dvc"]


@pytest.fixture(scope="module")
def team() -> Team:
    with team_services() as started:
        figure("faults: first `services up` (s)", started.seconds["first up"])
        yield started


@pytest.fixture(scope="module")
def workspace(team: Team, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_project_copy(tmp_path_factory.mktemp("faults") / "workspace")
    team.up(root, label="up for the workspace")
    done = ok(team.run([*DVC, "repro", "mix"], root))
    assert stages_run(done.stdout) == ["prepare", "mix"], done.stdout
    return root


def _locked(root: Path) -> set[str]:
    lock = root / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.is_file() else set()


def _error_line(text: str, stage: str) -> str:
    """The stage's own error line (posttrain.pipeline.entry), shortened for the figures table."""
    line = next(line for line in text.splitlines() if line.startswith(f"error: stage {stage}:"))
    return line if len(line) <= 320 else f"{line[:160]} ... {line[-160:]}"


def _runs(team: Team, stage: str) -> list:
    return [r for r in stage_runs(team.mlflow()) if r.info.run_name == stage]


def _version_of(team: Team, content: str) -> list:
    return [v for v in all_versions(team.mlflow()) if v.tags.get("posttrain.content_hash") == content]


def test_mlflow_killed_during_training_the_stage_waits_and_records_after_the_restart(
    team: Team, workspace: Path, tmp_path: Path
) -> None:
    log = tmp_path / "pretrain.log"
    process = team.start([*DVC, "repro", "pretrain"], workspace, log)
    wait_for_line(log, "stage pretrain: starting", process)  # after the start-up check passed
    team.kill("mlflow")
    killed = time.monotonic()
    # Training goes on without the server; then the stage waits for it instead of failing.
    wait_for_line(log, "cannot be reached", process, timeout=600)
    assert (workspace / "artifacts" / "models" / "pretrain" / "lineage.json").is_file()
    team.up(label="restart mlflow")
    assert process.wait(timeout=900) == 0, log.read_text()[-5000:]
    figure("MLflow killed during pretrain: server down (s)", time.monotonic() - killed)
    figure("MLflow killed during pretrain: its restart (`services up`, s)", team.seconds["restart mlflow"])
    runs = _runs(team, "pretrain")
    figure(
        "MLflow killed during pretrain: finished runs of the stage (expected 1)",
        [r.info.status for r in runs].count("FINISHED"),
    )
    assert [r.info.status for r in runs] == ["FINISHED"]
    content = lineage(workspace, "pretrain")["content_hash"]
    assert runs[0].data.tags["posttrain.content_hash"] == content and len(_version_of(team, content)) == 1
    assert "pretrain" in _locked(workspace)
    dvc_clean(team, workspace, "pretrain")


def test_mlflow_down_until_the_stage_records_refuses_naming_the_uri_and_the_rerun_loses_nothing(
    team: Team, workspace: Path, tmp_path: Path
) -> None:
    log = tmp_path / "cpt.log"
    process = team.start([*DVC, "repro", "cpt"], workspace, log, **{WAIT_ENV: "10"})
    wait_for_line(log, "stage cpt: starting", process)
    team.kill("mlflow")
    assert process.wait(timeout=900) != 0
    text = log.read_text()
    uri = team.client_env()["MLFLOW_TRACKING_URI"]
    assert f"error: stage cpt: the stage finished, but MLflow tracking server {uri}" in text, text[-4000:]
    assert f"{WAIT_ENV}=10" in text and "dvc repro cpt" in text
    figure("MLflow down at cpt's end: the stage's error", _error_line(text, "cpt"))
    # The model is written but DVC locked nothing: the workspace does not claim a recorded stage.
    first = lineage(workspace, "cpt")
    assert "cpt" not in _locked(workspace)
    assert "cpt" in ok(team.run([*DVC, "status", "cpt"], workspace)).stdout
    team.up(label="restart mlflow (2)")
    figure("MLflow down at cpt's end: stage failed, wait set to (s)", 10)
    rerun = ok(team.run([*DVC, "repro", "cpt"], workspace))
    assert stages_run(rerun.stdout) == ["cpt"]
    # The rerun resumed the final checkpoint: the same model, now recorded and registered once.
    assert lineage(workspace, "cpt")["content_hash"] == first["content_hash"]
    figure("MLflow down at cpt's end: rerun gave the same model (content hash)", "yes")
    assert [r.info.status for r in _runs(team, "cpt")] == ["FINISHED"]
    assert len(_version_of(team, first["content_hash"])) == 1
    dvc_clean(team, workspace, "cpt")


def test_postgres_restart_between_stages_loses_no_run(team: Team, workspace: Path) -> None:
    client = team.mlflow()
    before = {r.info.run_id: r.info.status for r in stage_runs(client)}
    versions = {(v.name, str(v.version)) for v in all_versions(client)}
    started = time.perf_counter()
    services.restart_postgres(team.state())  # fast shutdown: the servers' pooled connections are cut
    restart = time.perf_counter() - started
    # The next stage through both servers: Prefect (flow and task runs) and MLflow (runs, registry).
    done = ok(team.run([*CLI, "run", "--stages", "sft", "--no-promote"], workspace))
    ran = re.findall(r"(\S+): ran", done.stdout.strip().splitlines()[-1])
    assert "sft" in ran, done.stdout[-3000:]
    after = stage_runs(client)
    assert {r.info.run_id: r.info.status for r in after if r.info.run_id in before} == before
    new = sorted((r.info.run_name, r.info.status) for r in after if r.info.run_id not in before)
    assert new == sorted((stage, "FINISHED") for stage in ran)  # one finished run per stage that ran
    assert versions < {(v.name, str(v.version)) for v in all_versions(client)}
    api = team.client_env()["PREFECT_API_URL"]
    flow_runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}, timeout=30).json()
    assert flow_runs[0]["state_type"] == "COMPLETED"
    dvc_clean(team, workspace, "sft")
    figure("PostgreSQL restarted between stages: restart (s)", restart)
    figure(
        "PostgreSQL restarted between stages: earlier runs lost",
        len(before) - len([r for r in after if r.info.run_id in before]),
    )


def test_s3_unreachable_at_upload_registers_no_half_version_and_the_rerun_does(
    team: Team, workspace: Path, tmp_path: Path
) -> None:
    ok(team.run([*DVC, "repro", "sft"], workspace))  # dpo's inputs (nothing to do after the tests above)
    versions = {(v.name, str(v.version)) for v in all_versions(team.mlflow())}
    log = tmp_path / "dpo.log"
    process = team.start([*DVC, "repro", "dpo"], workspace, log)
    wait_for_line(log, "stage dpo: starting", process)
    team.kill("s3")
    killed = time.monotonic()
    assert process.wait(timeout=900) != 0
    failed_after = time.monotonic() - killed
    text = log.read_text()
    uri = team.client_env()["MLFLOW_TRACKING_URI"]
    assert "error: stage dpo:" in text and uri in text and "check its artifact store (S3)" in text, text[-4000:]
    figure("S3 killed during dpo: the stage's error", _error_line(text, "dpo"))
    now = {(v.name, str(v.version)) for v in all_versions(team.mlflow())}
    figure("S3 killed during dpo: versions registered without their artifacts", len(now - versions))
    figure("S3 killed during dpo: stage failed after (s)", failed_after)
    assert now == versions  # nothing half-registered
    assert {r.info.status for r in _runs(team, "dpo")} <= {"FAILED"}
    assert "dpo" not in _locked(workspace)
    team.up(label="restart s3")  # moto comes back empty; `up` creates the buckets again
    ok(team.run([*DVC, "repro", "dpo"], workspace))
    content = lineage(workspace, "dpo")["content_hash"]
    (version,) = _version_of(team, content)
    files = [f.path for f in team.mlflow().list_artifacts(version.run_id)]
    assert "lineage" in files and "metrics" in files, files
    assert [r.info.status for r in _runs(team, "dpo")].count("FINISHED") == 1
    dvc_clean(team, workspace, "dpo")


def test_prefect_server_restart_while_the_worker_holds_a_scheduled_run(team: Team, tmp_path: Path) -> None:
    toy = make_toy_project(tmp_path / "toy")
    (toy / "incoming").mkdir()
    (toy / "incoming" / "batch.csv").write_text("prompt,answer\n1+1=,2\n2+2=,4\n")
    ok(team.run([*CLI, "deploy", "--root", str(toy), "--cron", "0 3 * * *", "--pool", services.WORK_POOL], toy))
    api = team.client_env()["PREFECT_API_URL"]
    deployment = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()[0]
    # A run of the scheduled deployment, due now (the toy project has no registry: promote=None skips the promotion rules).
    flow_run = httpx.post(
        f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": {"promote": None}}, timeout=30
    ).json()

    def state() -> str | None:
        try:
            return httpx.get(f"{api}/flow_runs/{flow_run['id']}", timeout=10).json()["state_type"]
        except (httpx.HTTPError, KeyError, ValueError):
            return None

    assert flow_run["state_type"] == "SCHEDULED"
    # RUNNING: the worker took the run and its process talks to the server. (Killed earlier, while the run is
    # PENDING and its process still starting, the run ends CRASHED: Prefect's client retries a refused
    # connection only after a first successful one. docs/team-mode.md.)
    wait_for(lambda: state() == "RUNNING", "the worker to take the run and start it", timeout=300)
    worker = team.state().pids["worker"]
    team.kill("prefect")
    time.sleep(3)
    team.up(label="restart prefect")
    final = wait_for(lambda: state() in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and state(), "the run", 600)
    figure("Prefect server killed while the worker held a run: its restart (s)", team.seconds["restart prefect"])
    figure("Prefect server killed while the worker held a run: the run ended", final)
    assert final == "COMPLETED"
    assert services.alive(worker) and team.state().pids["worker"] == worker  # the worker lived through it
    assert sorted(p.name for p in (toy / "out").glob("*.txt")) == ["join.txt", "left.txt", "right.txt", "source.txt"]
    assert "up to date" in ok(team.run([*DVC, "status"], toy)).stdout
