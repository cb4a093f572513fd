"""`posttrain services` without starting anything: where state lives, how secrets are made and kept,
what clients are told, and the bounded wait of a finished stage for its tracking server."""

from __future__ import annotations

import ast
import stat
from pathlib import Path

import pytest

from posttrain.errors import ServicesError, TrackingError
from posttrain.pipeline import services
from posttrain.tracking import client

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*services.SECRET_NAMES, services.STATE_ENV, client.WAIT_ENV]:
        monkeypatch.delenv(name, raising=False)


def test_state_folder_comes_from_the_option_then_the_environment_then_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert services.state_dir(tmp_path) == tmp_path / ".services"
    monkeypatch.setenv(services.STATE_ENV, str(tmp_path / "shared"))
    assert services.state_dir(tmp_path) == tmp_path / "shared"
    assert services.state_dir(tmp_path, tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv(services.STATE_ENV)
    with pytest.raises(ServicesError, match="--state-dir"):
        services.state_dir(None)


def test_secrets_are_generated_once_kept_private_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = services.load_secrets(tmp_path)
    assert set(first) == set(services.SECRET_NAMES)
    assert all(len(value) == services.SECRET_NAMES[name] for name, value in first.items())
    assert stat.S_IMODE((tmp_path / "secrets.env").stat().st_mode) == 0o600
    assert services.load_secrets(tmp_path) == first  # kept: the database was initialised with them
    monkeypatch.setenv("POSTTRAIN_PG_PASSWORD", "from the environment, with 'quotes' $x")
    again = services.load_secrets(tmp_path)
    assert again["POSTTRAIN_PG_PASSWORD"] == "from the environment, with 'quotes' $x"
    assert {k: v for k, v in again.items() if k != "POSTTRAIN_PG_PASSWORD"} == {
        k: v for k, v in first.items() if k != "POSTTRAIN_PG_PASSWORD"
    }
    monkeypatch.setenv("POSTTRAIN_MLFLOW_PASSWORD", "short")
    with pytest.raises(ServicesError, match="POSTTRAIN_MLFLOW_PASSWORD: .* at least 12"):
        services.load_secrets(tmp_path)


def test_team_env_tells_clients_the_urls_and_the_login_and_nothing_else(tmp_path: Path) -> None:
    state = services.State(tmp_path, ports={"postgres": 5432, "s3": 9000, "mlflow": 5000, "prefect": 4200})
    secret = services.load_secrets(tmp_path) | {"POSTTRAIN_MLFLOW_PASSWORD": "pa ss'word\"$1 with spaces"}
    path = services._write_team_env(state, secret)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert services.read_client_env(tmp_path) == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        "MLFLOW_TRACKING_USERNAME": services.DB_USER,
        "MLFLOW_TRACKING_PASSWORD": "pa ss'word\"$1 with spaces",
    }
    state.auth = False
    services._write_team_env(state, secret)
    assert "MLFLOW_TRACKING_PASSWORD" not in services.read_client_env(tmp_path)
    # services.json and what `up`/`status` print hold ports, never a secret.
    state.save()
    shown = state.file.read_text() + "\n".join(services.describe(state))
    assert not [name for name, value in secret.items() if value in shown]


def test_missing_postgresql_names_the_package_and_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTTRAIN_PG_BIN", str(tmp_path))
    with pytest.raises(ServicesError, match=r"initdb was not found .*apt-get install -y postgresql.*POSTTRAIN_PG_BIN"):
        services.pg_tool("initdb")


def test_the_worker_serves_the_pool_posttrain_deploy_uses() -> None:
    tree = ast.parse((REPO / "flows" / "continual.py").read_text())
    pools = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_POOL" for t in node.targets)
    ]
    assert pools == [services.WORK_POOL]


def test_record_wait_is_bounded_and_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.record_wait_seconds() == client.DEFAULT_RECORD_WAIT
    monkeypatch.setenv(client.WAIT_ENV, "12.5")
    assert client.record_wait_seconds() == 12.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(client.WAIT_ENV, bad)
        with pytest.raises(TrackingError, match=rf"{client.WAIT_ENV}='{bad}': expected a number of seconds >= 0"):
            client.record_wait_seconds()
