"""Team services on one machine, for trying team mode and for the tests: `posttrain services up|status|down`.

`up` starts, each on a free port of 127.0.0.1 with its state under `<root>/.services/` (git-ignored;
`--state-dir` or POSTTRAIN_SERVICES_DIR elsewhere):

- **PostgreSQL** (the distribution's `initdb`/`pg_ctl`; as the `postgres` user when we are root,
  because initdb refuses root) holding the databases `mlflow`, `mlflow_auth` and `prefect`;
- **an S3-compatible store**: moto's server, buckets `posttrain-mlflow` and `posttrain-dvc`. moto
  keeps objects in memory: they are gone when it stops. Use MinIO (docker-compose.yml) for data you keep;
- **the MLflow tracking server**: `--backend-store-uri postgresql://...`, artifacts proxied to
  `s3://posttrain-mlflow`, MLflow's basic-auth app on (`--no-auth` turns it off);
- **the Prefect server** on the same PostgreSQL, and **a worker** on the process work pool that
  `posttrain deploy` uses;
- **the DVC remote** `team` of the workspace on `s3://posttrain-dvc` (in `.dvc/config.local`).

Secrets (database password, S3 keys, MLflow password) come from the environment (the names in
SECRET_NAMES) or are generated once into `<state>/secrets.env` (mode 0600). None is put on a command
line (visible in `ps`), in a URI, in services.json or in anything printed: PostgreSQL's clients read
PGPASSWORD from their environment, MLflow's auth app MLFLOW_AUTH_ADMIN_PASSWORD. Clients of the
services read `<state>/team.env` (mode 0600): `source .services/team.env` sets MLFLOW_TRACKING_URI,
MLFLOW_TRACKING_USERNAME/PASSWORD and PREFECT_API_URL; nothing else changes the embedded default.

`up` is idempotent: services that run are kept, services that are down start again on their old
port (clients keep working after a crash), and the workspace's DVC remote is written again.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import ServicesError

STATE_ENV = "POSTTRAIN_SERVICES_DIR"
STATE_DIR = ".services"
SERVICES = ("postgres", "s3", "mlflow", "prefect", "worker")
DB_USER = "posttrain"  # PostgreSQL role and MLflow admin user
DATABASES = ("mlflow", "mlflow_auth", "prefect")
MLFLOW_BUCKET, DVC_BUCKET = "posttrain-mlflow", "posttrain-dvc"
DVC_REMOTE = "team"
WORK_POOL = "posttrain-process"  # flows.continual.DEFAULT_POOL: the pool `posttrain deploy` uses
START_TIMEOUT = 240.0  # seconds per server; a first start migrates empty databases (~20-45 s on 2 busy cores)

# Secret -> length when generated. MLflow refuses admin passwords under 12 characters.
SECRET_NAMES = {
    "POSTTRAIN_PG_PASSWORD": 32,
    "POSTTRAIN_S3_ACCESS_KEY": 20,
    "POSTTRAIN_S3_SECRET_KEY": 40,
    "POSTTRAIN_MLFLOW_PASSWORD": 32,
    "POSTTRAIN_MLFLOW_SECRET_KEY": 48,  # Flask's CSRF key of MLflow's auth app
}


@dataclass
class State:
    """What services.json keeps (no secrets): ports, process ids, options."""

    folder: Path
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    auth: bool = True

    @property
    def file(self) -> Path:
        return self.folder / "services.json"

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "folder"}
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.file)

    def url(self, service: str) -> str:
        port = self.ports.get(service)
        return {
            "postgres": f"postgresql://{DB_USER}@127.0.0.1:{port}",
            "s3": f"http://127.0.0.1:{port}",
            "mlflow": f"http://127.0.0.1:{port}",
            "prefect": f"http://127.0.0.1:{port}/api",
            "worker": f"work pool {WORK_POOL}",
        }[service]


def state_dir(root: Path | None, given: Path | None = None) -> Path:
    """--state-dir, else POSTTRAIN_SERVICES_DIR, else <root>/.services."""
    if given is not None:
        return Path(given).resolve()
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).resolve()
    if root is None:
        raise ServicesError(f"no project root and no state folder: pass --root, --state-dir or set {STATE_ENV}")
    return (Path(root) / STATE_DIR).resolve()


def load_state(folder: Path) -> State:
    state = State(folder)
    if state.file.is_file():
        try:
            data = json.loads(state.file.read_text())
        except json.JSONDecodeError as error:
            raise ServicesError(f"{state.file}: not valid JSON ({error}); stop what runs and delete the file") from None
        state.ports, state.pids, state.auth = data.get("ports", {}), data.get("pids", {}), data.get("auth", True)
    return state


# --------------------------------------------------------------------------- secrets and client settings


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip().removeprefix("export ")
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = shlex.split(value)[0] if value.strip() else ""
    return values


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (created 0600, never briefly readable by others)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(text)
    tmp.replace(path)


def load_secrets(folder: Path) -> dict[str, str]:
    """Each secret from the environment, else from <state>/secrets.env, else generated and kept there."""
    path = folder / "secrets.env"
    stored = _read_env_file(path)
    values = {
        name: os.environ.get(name) or stored.get(name) or secrets.token_hex(size)[:size]
        for name, size in SECRET_NAMES.items()
    }
    if len(values["POSTTRAIN_MLFLOW_PASSWORD"]) < 12:
        raise ServicesError("POSTTRAIN_MLFLOW_PASSWORD: MLflow's auth app needs at least 12 characters")
    if values != stored:
        folder.mkdir(parents=True, exist_ok=True)
        _write_private(path, "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
    return values


def client_env(state: State, secret: dict[str, str]) -> dict[str, str]:
    """What a client of the services needs (team.env): the MLflow and Prefect URLs, MLflow's login."""
    env = {"MLFLOW_TRACKING_URI": state.url("mlflow"), "PREFECT_API_URL": state.url("prefect")}
    if state.auth:
        env |= {"MLFLOW_TRACKING_USERNAME": DB_USER, "MLFLOW_TRACKING_PASSWORD": secret["POSTTRAIN_MLFLOW_PASSWORD"]}
    return env


def read_client_env(folder: Path) -> dict[str, str]:
    """team.env of a running service set, as a mapping (tests and scripts use it instead of sourcing)."""
    return _read_env_file(Path(folder) / "team.env")


def _write_team_env(state: State, secret: dict[str, str]) -> Path:
    path = state.folder / "team.env"
    lines = ["# Team mode: `source` this file. Written by `posttrain services up`; holds a password: keep it private."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in client_env(state, secret).items()]
    _write_private(path, "\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As the servers bind: connections of the previous run in TIME_WAIT do not make the port taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def alive(pid: int | None) -> bool:
    """True for a running process (a zombie that nobody reaped yet counts as dead)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def stop_group(pid: int | None, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Signal the process group `pid` leads (each service runs in its own session), SIGKILL after `timeout`."""
    if not pid or not alive(pid):
        return
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _spawn(state: State, name: str, cmd: list[str], env: dict[str, str]) -> int:
    logs = state.folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            cmd, env=env, cwd=state.folder, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: `down` stops it with every child it forked
        )  # fmt: skip
    return process.pid


def _log_tail(state: State, name: str, lines: int = 15) -> str:
    path = state.folder / "logs" / f"{name}.log"
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []
    return "\n".join(f"    {line}" for line in text)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status < 500
    except urllib.error.HTTPError as error:
        return error.code < 500
    except (urllib.error.URLError, OSError):
        return False


def _wait(state: State, name: str, ready: Any, since: float, timeout: float = START_TIMEOUT) -> float:
    """Wait until `ready()` holds; the seconds since `since` (its launch, epoch seconds). Fails naming
    the service and its log when it dies or times out."""
    started = time.monotonic()
    while not ready():
        pid = state.pids.get(name)
        if name != "postgres" and not alive(pid):
            raise ServicesError(
                f"{name} exited during start-up; last lines of {state.folder / 'logs' / (name + '.log')}:\n"
                + _log_tail(state, name)
            )
        if time.monotonic() - started > timeout:
            raise ServicesError(
                f"{name} at {state.url(name)} not ready after {timeout:.0f} s; see its log:\n" + _log_tail(state, name)
            )
        time.sleep(0.3)
    return time.time() - since


def _base_env() -> dict[str, str]:
    """The caller's environment with this venv first on PATH (stage commands find `python` there) and
    every tool's telemetry off; without another service set's client settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PREFECT_API_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return env


def _tool(name: str) -> str:
    """A console script of this venv (mlflow, prefect)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


# --------------------------------------------------------------------------- PostgreSQL


def pg_tool(tool: str) -> str:
    """initdb / pg_ctl: POSTTRAIN_PG_BIN, else PATH, else the newest /usr/lib/postgresql/<v>/bin (Debian)."""
    if os.environ.get("POSTTRAIN_PG_BIN"):
        candidates = [Path(os.environ["POSTTRAIN_PG_BIN"]) / tool]
    else:
        found = shutil.which(tool)
        versions = sorted(
            Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), key=lambda p: int(p.parts[-3]), reverse=True
        )
        candidates = ([Path(found)] if found else []) + versions
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise ServicesError(
        f"PostgreSQL's {tool} was not found (POSTTRAIN_PG_BIN, PATH, /usr/lib/postgresql/*/bin); install the "
        "server (Debian/Ubuntu: apt-get install -y postgresql) or set POSTTRAIN_PG_BIN to its bin folder"
    )


def _pg_user() -> dict[str, int]:
    """subprocess arguments that run PostgreSQL's tools as a non-root user when we are root."""
    if os.geteuid() != 0:
        return {}
    import pwd  # lazy: POSIX only, and only root needs it

    name = os.environ.get("POSTTRAIN_PG_OS_USER", "postgres")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ServicesError(
            f"running as root, PostgreSQL needs a non-root user to own its cluster and '{name}' does not exist; "
            "create it (the postgresql package does) or set POSTTRAIN_PG_OS_USER to another user"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid}


def _pg(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}  # no secrets in the server's env
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, **_pg_user())


def _pg_folder(state: State) -> Path:
    return state.folder / "postgres"


def _pg_running(state: State) -> bool:
    data = _pg_folder(state) / "data"
    return data.is_dir() and _pg([pg_tool("pg_ctl"), "status", "-D", str(data)]).returncode == 0


def _pg_pid(state: State) -> int | None:
    try:
        return int((_pg_folder(state) / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _init_postgres(state: State, password: str) -> None:
    folder = _pg_folder(state)
    if (folder / "data" / "PG_VERSION").is_file():
        return
    owner = _pg_user()
    folder.mkdir(parents=True, exist_ok=True)
    if owner:
        os.chown(folder, owner["user"], owner["group"])
    folder.chmod(0o700)
    if _pg(["test", "-w", str(folder), "-a", "-x", str(folder)]).returncode != 0:
        closed = next((p for p in reversed(folder.parents) if not (p.stat().st_mode & 0o001)), folder)
        raise ServicesError(
            f"{folder}: PostgreSQL's user cannot reach this folder ({closed} is closed to other users); put the "
            f"state elsewhere (--state-dir or {STATE_ENV}) or open {closed} with chmod o+x"
        )
    pwfile = folder / "initdb.pw"
    _write_private(pwfile, password + "\n")
    if owner:
        os.chown(pwfile, owner["user"], owner["group"])
    try:
        done = _pg(
            [pg_tool("initdb"), "-D", str(folder / "data"), "-U", DB_USER, f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"]
        )  # fmt: skip
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise ServicesError(f"initdb of {folder / 'data'} failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")


def start_postgres(state: State, secret: dict[str, str]) -> None:
    _init_postgres(state, secret["POSTTRAIN_PG_PASSWORD"])
    if not _pg_running(state):
        folder = _pg_folder(state)
        options = f"-c listen_addresses=127.0.0.1 -p {state.ports['postgres']} -c unix_socket_directories=''"
        done = _pg(
            [pg_tool("pg_ctl"), "start", "-D", str(folder / "data"), "-l", str(folder / "postgres.log"), "-w", "-t", "90", "-o", options],
        )  # fmt: skip
        if done.returncode != 0:
            log = (folder / "postgres.log").read_text(errors="replace").splitlines()[-10:]
            raise ServicesError(f"pg_ctl start failed: {done.stderr.strip()}\n" + "\n".join(f"    {x}" for x in log))
    state.pids["postgres"] = _pg_pid(state) or 0
    _create_databases(state, secret)


def stop_postgres(state: State) -> None:
    if _pg_running(state):
        _pg([pg_tool("pg_ctl"), "stop", "-D", str(_pg_folder(state) / "data"), "-m", "fast", "-w", "-t", "60"])


def restart_postgres(state: State) -> None:
    """pg_ctl restart (fast shutdown: open connections are cut, as in a real database restart)."""
    folder = _pg_folder(state)
    # -l again: without it the new server would write to (and hold open) our captured stdout.
    done = _pg(
        [pg_tool("pg_ctl"), "restart", "-D", str(folder / "data"), "-l", str(folder / "postgres.log"), "-m", "fast", "-w", "-t", "90"]
    )  # fmt: skip
    if done.returncode != 0:
        raise ServicesError(f"pg_ctl restart failed: {done.stderr.strip()}")
    state.pids["postgres"] = _pg_pid(state) or 0


def _create_databases(state: State, secret: dict[str, str]) -> None:
    import psycopg2  # lazy: only `services up` talks to PostgreSQL directly

    connection = psycopg2.connect(
        host="127.0.0.1", port=state.ports["postgres"], user=DB_USER, dbname="postgres",
        password=secret["POSTTRAIN_PG_PASSWORD"], connect_timeout=10,
    )  # fmt: skip
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database")
            have = {row[0] for row in cursor.fetchall()}
            for name in DATABASES:
                if name not in have:
                    cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


# --------------------------------------------------------------------------- S3, MLflow, Prefect


def s3_client(state: State, secret: dict[str, str]) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=state.url("s3"), region_name="us-east-1",
        aws_access_key_id=secret["POSTTRAIN_S3_ACCESS_KEY"], aws_secret_access_key=secret["POSTTRAIN_S3_SECRET_KEY"],
    )  # fmt: skip


def _create_buckets(state: State, secret: dict[str, str]) -> None:
    client = s3_client(state, secret)
    have = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
        if bucket not in have:
            client.create_bucket(Bucket=bucket)


def _mlflow_auth_config(state: State) -> Path:
    """MLflow's basic-auth settings (users in PostgreSQL too). No password here: the admin's comes
    from MLFLOW_AUTH_ADMIN_PASSWORD, the database's from PGPASSWORD."""
    path = state.folder / "mlflow-auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = postgresql://{DB_USER}@127.0.0.1:{state.ports['postgres']}/mlflow_auth\n"
        f"admin_username = {DB_USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Without this cache every request re-hashes the password (PBKDF2): 620 ms per request against
        # 62 ms with it, measured on 2 busy cores. A changed password is honoured after 60 s at most.
        "auth_cache_ttl_seconds = 60\n"
    )
    return path


def _mlflow_command(state: State) -> list[str]:
    cmd = [
        _tool("mlflow"), "server", "--host", "127.0.0.1", "--port", str(state.ports["mlflow"]),
        "--workers", "1",  # one uvicorn worker (requests run in its thread pool): 2 cores here
        "--backend-store-uri", f"postgresql://{DB_USER}@127.0.0.1:{state.ports['postgres']}/mlflow",
        "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
    ]  # fmt: skip
    return cmd + (["--app-name", "basic-auth"] if state.auth else [])


def _server_env(state: State, secret: dict[str, str]) -> dict[str, str]:
    return _base_env() | {
        "PGPASSWORD": secret["POSTTRAIN_PG_PASSWORD"],
        "AWS_ACCESS_KEY_ID": secret["POSTTRAIN_S3_ACCESS_KEY"],
        "AWS_SECRET_ACCESS_KEY": secret["POSTTRAIN_S3_SECRET_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": state.url("s3"),
        # MLflow's job runner (GenAI scorers) forks 8 processes; nothing here uses it.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_AUTH_CONFIG_PATH": str(_mlflow_auth_config(state)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": secret["POSTTRAIN_MLFLOW_PASSWORD"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["POSTTRAIN_MLFLOW_SECRET_KEY"],
        "PREFECT_HOME": str(state.folder / "prefect"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
            f"postgresql+asyncpg://{DB_USER}@127.0.0.1:{state.ports['postgres']}/prefect"
        ),
        "PREFECT_API_URL": state.url("prefect"),
    }


def _commands(state: State, secret: dict[str, str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """argv and environment of each service that runs as our own process."""
    servers = _server_env(state, secret)
    # The worker runs flows, whose stages track to the team's MLflow: it gets what a client gets.
    worker = _base_env() | client_env(state, secret) | {"PREFECT_HOME": str(state.folder / "prefect-worker")}
    return {
        "s3": ([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(state.ports["s3"])], _base_env()),
        "mlflow": (_mlflow_command(state), servers),
        "prefect": (
            [_tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(state.ports["prefect"])],
            servers,
        ),
        "worker": ([_tool("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"], worker),
    }


def _worker_online(state: State, since: float) -> bool:
    """A worker of the pool sent a heartbeat after `since` (epoch seconds)."""
    request = urllib.request.Request(
        f"{state.url('prefect')}/work_pools/{WORK_POOL}/workers/filter", data=b"{}",
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            workers = json.loads(answer.read())
    except (urllib.error.URLError, OSError, json.JSONDecodeError):
        return False
    from datetime import datetime  # lazy: only this check parses times

    def beat(worker: dict[str, Any]) -> float:
        stamp = worker.get("last_heartbeat_time") or ""
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else 0.0

    return any(w.get("status") == "ONLINE" and beat(w) >= since - 1 for w in workers)


def _ready_check(state: State, name: str, since: float) -> Any:
    return {
        "s3": lambda: _http_ok(state.url("s3") + "/moto-api/"),
        "mlflow": lambda: _http_ok(state.url("mlflow") + "/health"),
        "prefect": lambda: _http_ok(state.url("prefect") + "/health"),
        "worker": lambda: _worker_online(state, since),
    }[name]


# --------------------------------------------------------------------------- up / status / down


def _running(state: State, name: str) -> bool:
    return _pg_running(state) if name == "postgres" else alive(state.pids.get(name))


def _choose_ports(state: State) -> None:
    """Keep each service's port (clients and team.env point there) unless something else took it."""
    for name in ("postgres", "s3", "mlflow", "prefect"):
        port = state.ports.get(name)
        if not port or (not _running(state, name) and not _port_free(port)):
            state.ports[name] = _free_port()


def up(root: Path | None, folder: Path, auth: bool = True, echo: Any = print) -> State:
    """Start every service that is not running (see the module docstring); configure `root`'s DVC remote."""
    folder.mkdir(parents=True, exist_ok=True)
    if _pg_user():  # PostgreSQL's own user must pass through to postgres/ (whatever the umask made)
        folder.chmod(folder.stat().st_mode | 0o011)
    state = load_state(folder)
    if _running(state, "mlflow") and state.auth != auth:
        raise ServicesError(
            f"the MLflow server of {folder} runs with basic-auth {'on' if state.auth else 'off'}; "
            "`posttrain services down` first to change it"
        )
    state.auth = auth
    secret = load_secrets(folder)
    _choose_ports(state)
    state.save()
    timings: dict[str, float] = {}
    started = time.monotonic()
    commands = _commands(state, secret)

    def launch(name: str) -> float | None:
        if _running(state, name):
            return None
        state.pids[name] = _spawn(state, name, *commands[name])
        state.save()
        return time.time()

    s3_since = launch("s3")  # moto starts while PostgreSQL does
    start_postgres(state, secret)
    timings["postgres"] = time.monotonic() - started
    if s3_since is not None:
        timings["s3"] = _wait(state, "s3", _ready_check(state, "s3", s3_since), s3_since)
    _create_buckets(state, secret)
    # The two servers start side by side (each migrates its database on the first start).
    since = {name: launch(name) for name in ("mlflow", "prefect")}
    for name in ("mlflow", "prefect"):
        if since[name] is not None:
            timings[name] = _wait(state, name, _ready_check(state, name, since[name]), since[name])
    worker_since = launch("worker")
    if worker_since is not None:
        timings["worker"] = _wait(state, "worker", _ready_check(state, "worker", worker_since), worker_since)
    state.save()
    env_file = _write_team_env(state, secret)
    for line in describe(state, timings):
        echo(line)
    if root is not None and (Path(root) / ".dvc").is_dir():
        echo(configure_dvc_remote(Path(root), state, secret))
    echo(f"team mode in this shell: source {env_file}")
    return state


def configure_dvc_remote(root: Path, state: State, secret: dict[str, str]) -> str:
    """The workspace's default DVC remote `team` on the S3 store, in .dvc/config.local (git-ignored,
    mode 0600: it holds the S3 keys); the committed .dvc/config is not touched."""
    from dvc.config import Config

    url = f"s3://{DVC_BUCKET}/store"
    config = Config(dvc_dir=str(root / ".dvc"))
    with config.edit("local") as local:
        local.setdefault("core", {})["remote"] = DVC_REMOTE
        local.setdefault("remote", {})[DVC_REMOTE] = {
            "url": url,
            "endpointurl": state.url("s3"),
            "access_key_id": secret["POSTTRAIN_S3_ACCESS_KEY"],
            "secret_access_key": secret["POSTTRAIN_S3_SECRET_KEY"],
        }
    (root / ".dvc" / "config.local").chmod(0o600)
    return f"DVC remote '{DVC_REMOTE}' ({url} on {state.url('s3')}) is the default of {root} (.dvc/config.local)"


def status(folder: Path) -> dict[str, dict[str, Any]]:
    """{service: {running, pid, url}} of the service set in `folder`."""
    state = load_state(folder)
    out = {}
    for name in SERVICES:
        running = state.file.is_file() and _running(state, name)
        pid = (_pg_pid(state) if name == "postgres" else state.pids.get(name)) if running else None
        out[name] = {
            "running": running,
            "pid": pid,
            "url": state.url(name) if state.ports or name == "worker" else None,
        }
    return out


def describe(state: State, timings: dict[str, float] | None = None) -> list[str]:
    notes = {
        "s3": "moto, in memory: emptied when it stops",
        "mlflow": f"backend PostgreSQL, artifacts s3://{MLFLOW_BUCKET}, basic-auth {'on' if state.auth else 'off'}",
        "prefect": "database PostgreSQL",
        "worker": "process worker",
    }
    lines = []
    for name, info in status(state.folder).items():
        took = f", started in {timings[name]:.1f} s" if timings and name in timings else ""
        word = "running" if info["running"] else "stopped"
        lines.append(f"{name:<9}{word:<9}{info['url'] or '-':<40}{notes.get(name, '')}{took}")
    return lines


def down(folder: Path, purge: bool = False) -> list[str]:
    """Stop the services (worker first: it ignores SIGTERM once its server is gone); `purge` also
    deletes the state folder: databases, secrets, logs."""
    state = load_state(folder)
    stopped = []
    for name in ("worker", "prefect", "mlflow", "s3"):
        if alive(state.pids.get(name)):
            stop_group(state.pids[name])
            stopped.append(name)
        state.pids.pop(name, None)
    if (_pg_folder(state) / "data").is_dir() and _pg_running(state):
        stop_postgres(state)
        stopped.append("postgres")
    state.pids.pop("postgres", None)
    if state.file.is_file():
        state.save()
    if purge and folder.is_dir():
        shutil.rmtree(folder)
    return stopped
