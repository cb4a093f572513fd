"""Team services for the `team` tests: one real service set (`posttrain services up`: PostgreSQL, moto's
S3 server, the MLflow and Prefect servers, a process worker) per test module, on free ports of
127.0.0.1, stopped and deleted even when a test fails.

The state folder is under /tmp, not pytest's base temp folder: that one is mode 0700 and PostgreSQL
runs as its own user (we are root in CI), which must reach its data folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers.projects import project_env
from helpers.tiny import REPO
from posttrain.pipeline import services

CLI = [sys.executable, "-m", "posttrain.pipeline.cli"]
FIGURES_ENV = "POSTTRAIN_TEAM_FIGURES"  # bench/team_mode.py: where the tests write what they measured


def figure(name: str, value: Any) -> None:
    """Keep a measured figure (seconds, counts) in the JSON file named by POSTTRAIN_TEAM_FIGURES, if set."""
    target = os.environ.get(FIGURES_ENV)
    if not target:
        return
    path = Path(target)
    figures = json.loads(path.read_text()) if path.is_file() else {}
    figures[name] = round(value, 1) if isinstance(value, float) else value
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


@dataclass
class Team:
    """A running service set and the commands the tests run against it."""

    folder: Path  # the state folder (services.json, secrets.env, team.env, logs/, postgres/)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each `services up`

    def state(self) -> services.State:
        return services.load_state(self.folder)

    def client_env(self) -> dict[str, str]:
        return services.read_client_env(self.folder)

    def secrets(self) -> dict[str, str]:
        return services.load_secrets(self.folder)

    def env(self, root: Path, **extra: str) -> dict[str, str]:
        """A user's shell in workspace `root` after `source .services/team.env` (Prefect's profile kept in it)."""
        return project_env(root) | self.client_env() | {"PREFECT_HOME": str(root / ".prefect")} | extra

    def up(self, root: Path | None = None, label: str = "up") -> subprocess.CompletedProcess:
        """`posttrain services up` (for `root`: also its DVC remote); starts what is down, on its old port."""
        env = project_env(REPO) | {
            services.STATE_ENV: str(self.folder),
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # the worker polls every 2 s (default 10): shorter tests
        }
        args = [*CLI, "services", "up", *(["--root", str(root)] if root else [])]
        started = time.perf_counter()
        done = subprocess.run(args, cwd=root or REPO, env=env, capture_output=True, text=True, timeout=600)
        self.seconds[label] = time.perf_counter() - started
        assert done.returncode == 0, f"services up failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def kill(self, name: str) -> None:
        """A crash: SIGKILL to the service's whole process group, no shutdown."""
        pid = self.state().pids[name]
        services.stop_group(pid, timeout=10, sig=signal.SIGKILL)
        assert not services.alive(pid), f"{name} (pid {pid}) survived SIGKILL"

    def run(self, args: list[str], root: Path, timeout: int = 900, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, cwd=root, env=self.env(root, **extra), capture_output=True, text=True, timeout=timeout
        )

    def start(self, args: list[str], root: Path, log: Path, **extra: str) -> subprocess.Popen:
        """A command in the background, its output (stdout and stderr) going to `log` as it comes."""
        with open(log, "w") as handle:
            return subprocess.Popen(
                args, cwd=root, env=self.env(root, **extra), stdout=handle, stderr=subprocess.STDOUT
            )

    def mlflow(self) -> Any:
        from mlflow import MlflowClient

        uri = self.client_env()["MLFLOW_TRACKING_URI"]
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (
        f"{' '.join(map(str, done.args))} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    )
    return done


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 300.0, every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Until `text` appears in the log of `process` (fails at once if the process ends first)."""

    def seen() -> bool:
        if text in log.read_text(errors="replace"):
            return True
        assert process.poll() is None, (
            f"ended ({process.returncode}) before printing {text!r}:\n{log.read_text()[-4000:]}"
        )
        return False

    wait_for(seen, f"{text!r} in {log}", timeout)


@contextlib.contextmanager
def team_services() -> Iterator[Team]:
    """`posttrain services up` in a fresh folder; down and deleted afterwards, whatever happened. The MLflow
    login is put in this process's environment too (MLflow's client reads it on every request)."""
    base = Path(tempfile.mkdtemp(prefix="posttrain-team-"))
    base.chmod(0o755)  # PostgreSQL's user must reach its data folder inside
    team = Team(base / "services")
    patch = pytest.MonkeyPatch()
    try:
        team.up(label="first up")
        env = team.client_env()
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            patch.setenv(key, env[key])
        yield team
    finally:
        patch.undo()
        with contextlib.suppress(Exception):
            services.down(team.folder)
        # Whatever `down` could not stop (a state file the test broke, a half-started set).
        with contextlib.suppress(Exception):
            for pid in json.loads((team.folder / "services.json").read_text()).get("pids", {}).values():
                services.stop_group(pid, timeout=5, sig=signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def lineage(root: Path, stage: str) -> dict[str, Any]:
    return json.loads((root / "artifacts" / "models" / stage / "lineage.json").read_text())


def dvc_clean(team: Team, root: Path, *targets: str) -> str:
    """`dvc status` of `targets`: asserts every output matches dvc.lock; returns DVC's answer."""
    done = ok(team.run([sys.executable, "-m", "dvc", "status", *targets], root))
    assert "changed" not in done.stdout and "modified" not in done.stdout, done.stdout
    return done.stdout


def stage_runs(client: Any, experiment: str = "posttrain") -> list[Any]:
    """Every stage run (tag posttrain.kind=stage) of the experiment, any status."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], "tags.`posttrain.kind` = 'stage'", max_results=1000)


def all_versions(client: Any, prefix: str = "posttrain") -> list[Any]:
    """Every registered version of the recipe's model(s): `<prefix>` or `<prefix>-<stage>`, whichever the
    registry names them (one registered model per recipe)."""
    names = [m.name for m in client.search_registered_models(max_results=1000)]
    mine = [n for n in names if n == prefix or n.startswith(prefix + "-")]
    return [v for n in mine for v in client.search_model_versions(f"name = '{n}'", max_results=1000)]


def sh(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return ok(subprocess.run(args, cwd=cwd, env=project_env(cwd), capture_output=True, text=True, timeout=300))
