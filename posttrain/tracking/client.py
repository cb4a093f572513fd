"""The MLflow connection shared by runs and the registry: where the store is, retries, tags.

`import mlflow` stays inside functions (lazy): the CLI imports the tracking package for `--help`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from posttrain.config import Params
from posttrain.errors import TrackingError
from posttrain.io import redact
from posttrain.layout import find_root

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

TAG = "posttrain."  # namespace of every tag this project writes
_T = TypeVar("_T")


def resolve_tracking_uri(params: Params, root: Path) -> tuple[str, str]:
    """(uri, where it came from). Params win over the environment, which wins over the default."""
    if params.tracking.tracking_uri:
        return params.tracking.tracking_uri, "params.yaml tracking.tracking_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "environment variable MLFLOW_TRACKING_URI"
    return f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}", "default (SQLite store in the project)"


def _artifact_location(uri: str) -> str | None:
    """Experiments in a SQLite store keep artifacts in `mlruns/` beside the database file (MLflow's
    own default is `./mlruns` relative to whatever the current directory happens to be)."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides where its artifacts go
    db = Path(urllib.parse.urlsplit(uri).path)
    return (db.parent / "mlruns").resolve().as_uri()


def check_store_writable(uri: str, source: str) -> None:
    """A SQLite store (and its mlruns/ folder) that cannot be written would fail only after training."""
    db = Path(urllib.parse.urlsplit(uri).path)
    for path in (db, db.parent / "mlruns"):
        target = path if path.exists() else path.parent
        usable = target.is_dir() if target != db else target.is_file()
        if not usable or not os.access(target, os.W_OK):
            raise TrackingError(
                f"MLflow store {redact(uri)} (from {source}): {target} is not writable; fix its permissions, "
                "point tracking.tracking_uri elsewhere, or set tracking.enabled: false"
            )


WAIT_ENV = "POSTTRAIN_TRACKING_WAIT_SECONDS"
DEFAULT_RECORD_WAIT = 300.0


def record_wait_seconds() -> float:
    """How long a finished stage waits for an unreachable tracking server before it fails.

    Its training is done (hours, on a GPU): a server restart must not throw it away. Restarting the
    MLflow server on PostgreSQL took 20-45 s on 2 busy cores (docs/team-mode.md). The environment
    variable POSTTRAIN_TRACKING_WAIT_SECONDS (default 300) sets it; 0 fails at once.
    """
    raw = os.environ.get(WAIT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_RECORD_WAIT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise TrackingError(f"environment variable {WAIT_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


def check_tracking_server(
    params: Params, root: Path | None = None, timeout: float = 3.0, wait: float = 0.0
) -> str | None:
    """Fail fast, before any training, when a configured http(s) tracking server cannot be reached
    or refuses our credentials.

    Returns the tracking URI (None when tracking is off). Any HTTP answer to /health counts as
    reachable; only refused connections, DNS failures and timeouts are retried, for up to `wait`
    seconds (0: fail at once; MLflow's own client would retry each request for about two minutes).
    Then one read of the experiment checks the credentials (MLFLOW_TRACKING_USERNAME/PASSWORD,
    MLFLOW_TRACKING_TOKEN or ~/.mlflow/credentials, as MLflow reads them) against a server with auth.
    """
    if not params.tracking.enabled:
        return None
    uri, source = resolve_tracking_uri(params, root or find_root())
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "sqlite":
        check_store_writable(uri, source)
    if parts.scheme not in ("http", "https"):
        return uri
    # Credentials stay out of the probe URL (urllib cannot parse them, and /health needs none).
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    probe = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    started = time.perf_counter()
    delay = 1.0
    while True:
        try:
            with urllib.request.urlopen(probe, timeout=timeout):
                pass
            break
        except urllib.error.HTTPError:
            break  # the server answered
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            waited = time.perf_counter() - started
            if waited >= wait:
                waiting = f"; waited {waited:.0f} s ({WAIT_ENV}={wait:g})" if wait else ""
                raise TrackingError(
                    f"MLflow tracking server {redact(uri)} (from {source}) cannot be reached "
                    f"({reason}; gave up after {waited:.1f} s{waiting}). Start the server, fix the URI, "
                    "set tracking.tracking_uri: null in params.yaml (and unset MLFLOW_TRACKING_URI) to use the "
                    "local SQLite store, or set tracking.enabled: false to run without tracking."
                ) from None
            log.warning(
                "MLflow tracking server %s cannot be reached (%s); trying again in %.0f s (waiting up to %.0f s, %s)",
                redact(uri), reason, min(delay, wait - waited), wait, WAIT_ENV,
            )  # fmt: skip
            time.sleep(min(delay, wait - waited))  # the last try comes at the deadline, not before it
            delay = min(delay * 2, 15.0)
    # Later calls fail within minutes, not the default ~2 minutes of retries per request.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    check_credentials(uri, source, params.tracking.experiment)
    return uri


def check_credentials(uri: str, source: str, experiment: str) -> None:
    """A server with auth (e.g. `mlflow server --app-name basic-auth`) that refuses us fails here, before
    training, naming what to set; the credentials themselves are never part of the message."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except MlflowException as error:
        if error.error_code == "UNAUTHENTICATED":
            given = "were refused" if os.environ.get("MLFLOW_TRACKING_USERNAME") else "are not set"
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} (from {source}) requires a login (HTTP 401) and the credentials "
                f"{given}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
                "environment, never in params.yaml"
            ) from None
        if error.error_code == "PERMISSION_DENIED":
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "the configured user")
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} (from {source}): user '{user}' may not read experiment "
                f"'{experiment}' (HTTP 403); ask the server's admin for permission"
            ) from None
        # Anything else (a missing endpoint on a proxy, ...) shows up where the run is written.


def is_locked_error(error: BaseException) -> bool:
    return "database is locked" in str(error) or "database table is locked" in str(error)


def retry_locked(function: Callable[..., _T], *args: Any, attempts: int = 8, delay: float = 0.2, **kwargs: Any) -> _T:
    """Call `function`, retrying with exponential backoff while SQLite reports the database locked.

    Two stages running in parallel (orchestration.max_parallel) write to one mlflow.db; SQLite lets
    one writer in at a time and its driver waits only 5 s. A lock is contention, not an error.
    """
    for attempt in range(attempts):
        try:
            return function(*args, **kwargs)
        except Exception as error:  # MlflowException wraps sqlalchemy's OperationalError
            if not is_locked_error(error) or attempt == attempts - 1:
                raise
            wait = delay * 2**attempt
            log.warning("MLflow store is locked; retrying in %.1f s (attempt %d/%d)", wait, attempt + 1, attempts)
            time.sleep(wait)
    raise AssertionError("unreachable")


def connect(params: Params, root: Path, wait: float = 0.0) -> MlflowClient:
    """A client on the resolved tracking and registry URI; also sets MLflow's global URIs, which
    `log_model` and `load_model("models:/...")` read. `wait`: seconds to wait for a server that
    cannot be reached (`check_tracking_server`)."""
    import mlflow
    from mlflow import MlflowClient

    uri = check_tracking_server(params, root, wait=wait) or resolve_tracking_uri(params, root)[0]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, params: Params) -> str:
    from mlflow.exceptions import MlflowException

    name = params.tracking.experiment
    found = retry_locked(client.get_experiment_by_name, name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            retry_locked(client.restore_experiment, found.experiment_id)
        return found.experiment_id
    try:
        return retry_locked(client.create_experiment, name, artifact_location=_artifact_location(client.tracking_uri))
    except MlflowException:  # another stage created it a moment ago
        found = retry_locked(client.get_experiment_by_name, name)
        if found is None:
            raise
        return found.experiment_id


def lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    """A model's lineage record as flat string tags (runs and registry versions carry the same)."""
    git = lineage.get("git") or {}
    tags = {
        "stage": lineage.get("stage"),
        "content_hash": lineage.get("content_hash"),
        "params_hash": lineage.get("params_hash"),
        "data_manifest_hash": lineage.get("data_manifest_hash"),
        "seed": lineage.get("seed"),
        "created_at": lineage.get("created_at"),
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "chat_template_fingerprint": lineage.get("chat_template_fingerprint"),
        "parents": json.dumps(
            [{k: p.get(k) for k in ("stage", "content_hash", "weight")} for p in lineage.get("parents") or []]
        ),
    }
    for library, version in (lineage.get("versions") or {}).items():
        tags[f"version.{library}"] = version
    return {TAG + key: str(value) for key, value in tags.items() if value is not None}
