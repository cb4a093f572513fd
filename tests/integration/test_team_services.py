"""Team mode on real services (`posttrain services up`): two users at once, a third reproducing from the
remote, concurrent promotion, and no credentials anywhere they should not be.

One service set for the module (PostgreSQL, moto's S3 server, the MLflow server with basic-auth on
PostgreSQL and S3, the Prefect server on PostgreSQL and a process worker). Users A and C run the tiny
recipe at the same time through `posttrain run` (flows on the team's Prefect server, runs on its
MLflow server), C with another seed; A pushes to the DVC remote and B, a fresh clone, pulls and
reproduces nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers.projects import make_project_copy, stages_run
from helpers.team import (
    CLI,
    Team,
    all_versions,
    dvc_clean,
    figure,
    lineage,
    ok,
    sh,
    stage_runs,
    team_services,
    wait_for,
)

from posttrain.config import load_params
from posttrain.lineage import file_hashes
from posttrain.pipeline import services
from posttrain.tracking.runs import scalar_metrics, stage_params

pytestmark = [pytest.mark.team, pytest.mark.e2e]

STAGES = ("prepare", "mix", "pretrain", "cpt", "sft", "dpo", "grpo", "merge", "evaluate")
MODEL_STAGES = ("pretrain", "cpt", "sft", "dpo", "grpo", "merge")


@pytest.fixture(scope="module")
def team() -> Team:
    with team_services() as started:
        figure("services: first `services up` (s)", started.seconds["first up"])
        yield started


@dataclass
class Users:
    a: Path
    c: Path
    output: dict[str, str]
    seconds: dict[str, float]


def _commit(root: Path, message: str) -> None:
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], root)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], root)


@pytest.fixture(scope="module")
def two_users(team: Team, tmp_path_factory: pytest.TempPathFactory) -> Users:
    """A and C, each in their own workspace, run the tiny recipe at the same time against the team's
    MLflow and Prefect servers; C with seed 1235 (another experiment), so their models differ."""
    base = tmp_path_factory.mktemp("users")
    a, c = make_project_copy(base / "a"), make_project_copy(base / "c")
    raw = yaml.safe_load((c / "params.yaml").read_text())
    raw["seed"] = 1235
    (c / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _commit(c, "seed 1235")
    for root in (a, c):
        team.up(root, label=f"up for {root.name}")  # the workspace's DVC remote
    started = time.perf_counter()
    logs = {root.name: root / "run.log" for root in (a, c)}
    running = {root.name: team.start([*CLI, "run", "--no-promote"], root, logs[root.name]) for root in (a, c)}
    seconds: dict[str, float] = {}
    while len(seconds) < len(running):  # each user's own wall time
        for name, process in running.items():
            if name not in seconds and process.poll() is not None:
                seconds[name] = time.perf_counter() - started
        assert time.perf_counter() - started < 1800, "the two runs took over 30 min"
        time.sleep(1)
    output = {name: log.read_text() for name, log in logs.items()}
    for name, process in running.items():
        assert process.returncode == 0, f"user {name}: posttrain run failed:\n{output[name][-6000:]}"
        assert "prepare: ran  mix: ran  pretrain: ran" in output[name], output[name][-3000:]
    figure("users: workspaces running the tiny recipe at once", 2)
    figure("users: A's `posttrain run` (s)", seconds["a"])
    figure("users: C's `posttrain run` (s)", seconds["c"])
    _commit(a, "run of the tiny recipe")  # what B clones: dvc.lock, metrics, plots
    return Users(a, c, output, seconds)


def test_services_status_lists_every_service_running(team: Team) -> None:
    done = ok(subprocess.run([*CLI, "services", "status", "--state-dir", str(team.folder), "--json"],
                             capture_output=True, text=True, timeout=120))  # fmt: skip
    found = json.loads(done.stdout)
    assert set(found) == set(services.SERVICES) and all(info["running"] for info in found.values()), found
    env = team.client_env()
    assert env["MLFLOW_TRACKING_URI"] == found["mlflow"]["url"] and env["PREFECT_API_URL"] == found["prefect"]["url"]
    assert (team.folder / "team.env").stat().st_mode & 0o777 == 0o600
    assert (team.folder / "secrets.env").stat().st_mode & 0o777 == 0o600


def test_two_users_at_once_each_run_is_intact_and_attributed(team: Team, two_users: Users) -> None:
    client = team.mlflow()
    runs = stage_runs(client)
    parents: dict[str, list[Any]] = {}
    for run in runs:
        parents.setdefault(run.data.tags["mlflow.parentRunId"], []).append(run)
    # One pipeline run (parent) per user, each with exactly one finished run per stage: nothing lost, nothing doubled.
    assert len(parents) == 2, {p: sorted(r.info.run_name for r in rs) for p, rs in parents.items()}
    by_user = {}
    for children in parents.values():
        assert sorted(r.info.run_name for r in children) == sorted(STAGES)
        assert {r.info.status for r in children} == {"FINISHED"}
        seed = {r.data.params.get("seed") for r in children} - {None}
        assert len(seed) == 1, seed
        by_user[{"1234": "a", "1235": "c"}[seed.pop()]] = {r.info.run_name: r for r in children}
    assert set(by_user) == {"a", "c"}
    figure("users: stage runs recorded (expected 2 x 9)", len(runs))
    # They really ran at the same time: each user's stage runs started while the other's were going on.
    spans = {u: [r.info.start_time for r in rs.values()] for u, rs in by_user.items()}
    assert min(spans["a"]) < max(spans["c"]) and min(spans["c"]) < max(spans["a"]), spans

    versions = {(v.name, str(v.version)): v for v in all_versions(client)}
    for user, root in (("a", two_users.a), ("c", two_users.c)):
        params = load_params(root / "params.yaml")
        for stage, run in by_user[user].items():
            # Params: exactly what the user's params.yaml holds for the keys the stage declares.
            expected = {k.replace("@", ":"): v for k, v in stage_params(params, root, stage).items()}
            assert run.data.params == expected, (user, stage)
            if stage == "evaluate":
                continue
            # Metrics: every number of the user's metrics file, as written by the stage.
            written = json.loads((root / "artifacts" / "metrics" / f"{stage}.json").read_text())
            for name, value in scalar_metrics(written).items():
                assert run.data.metrics[name] == pytest.approx(value, nan_ok=True), (user, stage, name)
            if stage not in MODEL_STAGES:
                continue
            # Lineage: the run's tags and artifact, and the registered version, are this user's model.
            mine = lineage(root, stage)
            assert run.data.tags["posttrain.content_hash"] == mine["content_hash"], (user, stage)
            local = client.download_artifacts(run.info.run_id, "lineage/lineage.json", str(root / "downloaded"))
            assert json.loads(Path(local).read_text()) == mine, (user, stage)
            version = versions[
                (run.data.tags["posttrain.registered_model"], run.data.tags["posttrain.registered_version"])
            ]
            assert version.run_id == run.info.run_id and version.tags["posttrain.content_hash"] == mine["content_hash"]
    # The two users' models differ (another seed), and each is registered once.
    assert lineage(two_users.a, "merge")["content_hash"] != lineage(two_users.c, "merge")["content_hash"]
    hashes = [v.tags["posttrain.content_hash"] for v in versions.values()]
    assert len(hashes) == len(set(hashes)) == 2 * len(MODEL_STAGES)
    figure("users: registered versions (expected 2 x 6)", len(hashes))


def test_user_b_reproduces_from_the_remote_without_training(team: Team, two_users: Users, tmp_path: Path) -> None:
    a, b = two_users.a, tmp_path / "b"
    dvc = [sys.executable, "-m", "dvc"]
    started = time.perf_counter()
    pushed = ok(team.run([*dvc, "push"], a))
    push_seconds = time.perf_counter() - started
    sh(["git", "clone", "-q", str(a), str(b)], tmp_path)
    team.up(b, label="up for b")
    started = time.perf_counter()
    ok(team.run([*dvc, "pull"], b))
    pull_seconds = time.perf_counter() - started
    repro = ok(team.run([*dvc, "repro"], b))
    figure("B: stages rerun by `dvc repro` after `dvc pull`", len(stages_run(repro.stdout)))
    assert stages_run(repro.stdout) == [], repro.stdout  # nothing trained again
    for stage in MODEL_STAGES:
        assert file_hashes(b / "artifacts" / "models" / stage) == file_hashes(a / "artifacts" / "models" / stage), stage
    dvc_clean(team, b)
    # B's registry is the team's: A's registered versions are there (by content hash).
    shown = ok(team.run([*CLI, "registry"], b)).stdout
    for stage in MODEL_STAGES:
        assert lineage(a, stage)["content_hash"][:12] in shown, (stage, shown)
    figure("B: `dvc push` by A (s)", push_seconds)
    figure("B: files pushed", int(pushed.stdout.split()[0]))
    figure("B: `dvc pull` (s)", pull_seconds)
    figure("B: model folders byte-identical to A's", len(MODEL_STAGES))


# The go-signal wrapper: each promotion imports what it needs first, then both start within milliseconds,
# so the test does not depend on which process happened to import faster.
AT_ONCE = """
import sys, time
from pathlib import Path
import mlflow, posttrain.tracking.registry
from posttrain.pipeline import cli
Path(sys.argv[1] + ".ready").touch()
while not Path(sys.argv[1]).exists():
    time.sleep(0.002)
sys.argv = ["posttrain", *sys.argv[2:]]
cli.main()
"""


def test_two_promotions_at_once_leave_exactly_one_champion(team: Team, two_users: Users, tmp_path: Path) -> None:
    client = team.mlflow()
    prefix = load_params(two_users.a / "params.yaml").tracking.registered_model_prefix

    def aliases() -> list[tuple[str, str, str]]:
        models = [m for m in client.search_registered_models(max_results=1000) if m.name.startswith(prefix)]
        return [(m.name, alias, str(v)) for m in models for alias, v in (m.aliases or {}).items()]

    assert not [a for a in aliases() if a[1] == "champion"], "a champion exists before the test"
    go = tmp_path / "go"
    running = {}
    for root in (two_users.a, two_users.c):
        # --force: the race is the subject here, not the rules (the tiny recipe learns too little to pass them);
        # a forced promotion takes the same lock and loses the same way.
        args = [sys.executable, "-c", AT_ONCE, str(go) + root.name, "promote", "--force", "--reason", "race test",
                "--root", str(root)]  # fmt: skip
        running[root.name] = subprocess.Popen(args, cwd=root, env=team.env(root), stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_for(lambda: all(Path(f"{go}{n}.ready").exists() for n in running), "both promotions ready", 300)
    for name in running:
        Path(f"{go}{name}").touch()
    results = {name: (p.wait(timeout=600), p.stdout.read()) for name, p in running.items()}

    champions = [a for a in aliases() if a[1] == "champion"]
    won = [n for n, (code, out) in results.items() if code == 0 and "now the champion" in out]
    figure("promotion: `champion` aliases after two promotions at once", len(champions))
    figure("promotion: commands that said they made the champion", len(won))
    assert len(champions) == 1, (champions, results)
    for name, _, version in aliases():  # no alias left pointing at nothing
        assert client.get_model_version(name, version).status == "READY"
    assert len(won) == 1, results
    code, out = results[({"a", "c"} - set(won)).pop()]
    assert code != 0 and "now the champion" not in out, out
    assert re.search(r"lock|champion", out, re.IGNORECASE), out  # the loser says why it lost
    assert re.search(rf"version {champions[0][2]} \('[^']+'\) is now the champion", results[won[0]][1])
    assert "another promotion made version" in out and "Run `posttrain promote` again" in out


def _secrets_in(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value in text]


def test_no_credentials_in_runs_registry_lineage_logs_or_dvc_lock(team: Team, two_users: Users) -> None:
    # The S3 access key *id* is an identifier, not a secret: every SigV4 presigned URL carries it (MLflow's
    # server hands out such URLs for artifact downloads; moto's access log shows them). The secret key is never sent.
    secrets = {k: v for k, v in team.secrets().items() if k != "POSTTRAIN_S3_ACCESS_KEY"}
    assert all(len(v) >= 32 for v in secrets.values())
    # The scan sees a secret where there is one (team.env holds the MLflow password on purpose).
    assert _secrets_in((team.folder / "team.env").read_text(), secrets) == ["POSTTRAIN_MLFLOW_PASSWORD"]
    found: dict[str, list[str]] = {}
    scanned = 0

    def scan(where: str, text: str) -> None:
        nonlocal scanned
        scanned += 1
        if leaked := _secrets_in(text, secrets):
            found[where] = leaked

    client = team.mlflow()
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            scan(f"run {run.info.run_id}", json.dumps([run.data.params, run.data.tags]))
    for version in all_versions(client):
        scan(
            f"version {version.name}/{version.version}", json.dumps([version.tags, version.description, version.source])
        )
    # Everything in the S3 store: MLflow's artifacts (models, metrics, cards) and the DVC remote.
    s3 = services.s3_client(team.state(), team.secrets())
    for bucket in (services.MLFLOW_BUCKET, services.DVC_BUCKET):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                scan(f"s3://{bucket}/{item['Key']}", body.decode("latin-1"))
    # The workspaces: every file git tracks (dvc.lock, params.yaml, .dvc/config, metrics) and every lineage.json.
    for root in (two_users.a, two_users.c):
        tracked = sh(["git", "ls-files"], root).stdout.split() + ["dvc.lock"]
        tracked += [str(p.relative_to(root)) for p in (root / "artifacts" / "models").glob("*/lineage.json")]
        for name in tracked:
            scan(f"{root.name}/{name}", (root / name).read_text(errors="replace"))
    # Logs: both users' runs (stage output included) and every service's log.
    for name, text in two_users.output.items():
        scan(f"output of user {name}", text)
    for log in [*(team.folder / "logs").glob("*.log"), team.folder / "postgres" / "postgres.log"]:
        scan(str(log), log.read_text(errors="replace"))
    # Prefect: flow-run parameters and every log line the flows sent to the server.
    api = team.client_env()["PREFECT_API_URL"]
    scan("prefect flow runs", httpx.post(f"{api}/flow_runs/filter", json={"limit": 200}, timeout=30).text)
    for offset in range(0, 5000, 200):
        page = httpx.post(f"{api}/logs/filter", json={"limit": 200, "offset": offset}, timeout=30).json()
        scan(f"prefect logs from {offset}", json.dumps(page))
        if len(page) < 200:
            break
    figure("security: places scanned for the 4 secrets", scanned)
    figure("security: places holding a secret", len(found))
    assert not found, found


def test_mlflow_login_comes_from_the_environment(team: Team, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from helpers.tiny import tiny_raw

    from posttrain.config import parse_params
    from posttrain.errors import TrackingError
    from posttrain.tracking.client import check_tracking_server

    uri = team.client_env()["MLFLOW_TRACKING_URI"]
    with pytest.raises(urllib.error.HTTPError) as refused:  # basic-auth is on: anonymous requests are refused
        urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401
    params = parse_params(tiny_raw(track=True))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(TrackingError, match=r"requires a login \(HTTP 401\) and the credentials are not set"):
        check_tracking_server(params, tmp_path)  # a stage stops here, before training
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", services.DB_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password-42")
    with pytest.raises(TrackingError, match="were refused") as caught:
        check_tracking_server(params, tmp_path)
    assert "not-the-password-42" not in str(caught.value)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team.client_env()["MLFLOW_TRACKING_PASSWORD"])
    assert check_tracking_server(params, tmp_path) == uri
