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


def check_tracking_server(params: Params, root: Path | None = None, timeout: float = 3.0) -> str | None:
    """Fail fast, before any training, when a configured http(s) tracking server cannot be reached.

    Returns the tracking URI (None when tracking is off). Any HTTP answer counts as reachable (a 401
    or 404 still proves a server is there); only refused connections, DNS failures and timeouts fail.
    MLflow's own client would retry for about two minutes before giving up.
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
    try:
        with urllib.request.urlopen(probe, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} (from {source}) cannot be reached "
            f"({reason}; gave up after {time.perf_counter() - started:.1f} s). Start the server, fix the URI, "
            "set tracking.tracking_uri: null in params.yaml (and unset MLFLOW_TRACKING_URI) to use the "
            "local SQLite store, or set tracking.enabled: false to run without tracking."
        ) from None
    # Later calls fail within minutes, not the default ~2 minutes of retries per request.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    return uri


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


def connect(params: Params, root: Path) -> MlflowClient:
    """A client on the resolved tracking and registry URI; also sets MLflow's global URIs, which
    `log_model` and `load_model("models:/...")` read."""
    # lazy: mlflow takes seconds to import; only tracking calls need it (the CLI imports this module for --help)
    import mlflow
    from mlflow import MlflowClient

    uri = check_tracking_server(params, root) or resolve_tracking_uri(params, root)[0]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, params: Params) -> str:
    # lazy: mlflow takes seconds to import; only tracking calls need it (the CLI imports this module for --help)
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
