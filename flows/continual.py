"""Continual pretraining flow: new data files arrive, the pipeline catches up, promotion decides.

Each run looks in `orchestration.continual.incoming_dir` for data files it has not
ingested yet (by content hash, recorded in `<store_dir>/<domain>.ingested.json`). With none it says
so and stops. With new files it

1. appends their rows to the domain's data and versions it with DVC: one JSON Lines file named by
   its content hash in `<store_dir>/<domain>/` (`dvc add` of that folder, so `dvc push` ships it);
   the suffixes are the data layer's own (posttrain.data.sources.FILE_SUFFIXES: .jsonl, .json,
   .ndjson, .csv, .parquet, .pq), and a row keeps its structure (a conversation's list of messages
   stays a list; numbers become strings, as the record schema has them);
2. registers it in params.yaml as file domain `data.domains.<domain>` (the path carries the
   content hash, so the `data` params DVC tracks change and `prepare` reruns) and adds it to the
   `cpt` mixture weights the first time;
3. runs the pipeline (DVC reruns prepare, mix, cpt and everything below; stages whose inputs did
   not change are skipped by DVC);
4. applies the promotion rules (`posttrain.tracking.registry.promote`).

A run whose pipeline or promotion failed leaves the ingest "pending"; the next run finishes it even
without new files.

Scheduling: `posttrain deploy` registers this flow as a cron deployment on a local Prefect server
(process work pool, `prefect worker start --pool posttrain-process`), or serves it in-process
with `--serve`. The same deployment on GPUs (Kubernetes work pool):

    prefect work-pool create gpu-k8s --type kubernetes   # then edit its job template, or pass:
    flow.from_source("https://git.example.com/team/posttrain.git", "flows/continual.py:continual_flow").deploy(
        name="continual", work_pool_name="gpu-k8s", cron="0 2 * * *",
        image="registry.example.com/posttrain:<tag>", build=False,       # image with the project installed
        job_variables={"env": {"PREFECT_LOGGING_LEVEL": "INFO"},
                       "resources": {"limits": {"nvidia.com/gpu": "1"}}},  # via the pool's job template
        parameters={"root": "/workspace/posttrain"})
    prefect worker start --pool gpu-k8s   # in the cluster

The pod needs the repository checked out at `root` with DVC's remote configured (`dvc pull`
before, `dvc push` after), and MLFLOW_TRACKING_URI pointing at a shared server.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import execute_pipeline, failure_state
from posttrain.config import ContinualConfig, load_params
from posttrain.data.sources import FILE_SUFFIXES
from posttrain.errors import DataError, PipelineError
from posttrain.io import write_json_atomic, write_text_atomic
from posttrain.pipeline import dag
from posttrain.pipeline.workspace import pipeline_lock
from posttrain.spec import sync_dvc_yaml

log = logging.getLogger("posttrain.continual")

DEFAULT_PROMOTE = "posttrain.tracking.registry:promote"
DEFAULT_POOL = "posttrain-process"


@dataclass
class Ingested:
    """What one ingest did: the new files, the version written and its rows."""

    files: list[str] = field(default_factory=list)
    version: str | None = None  # content hash of the domain's data after the ingest
    path: str | None = None  # the versioned file, relative to the project root
    rows: int = 0
    pending: bool = False  # an earlier ingest whose pipeline or promotion has not finished


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state_path(root: Path, cfg: ContinualConfig) -> Path:
    return root / cfg.store_dir / f"{cfg.domain}.ingested.json"


def read_state(root: Path, cfg: ContinualConfig) -> dict[str, Any]:
    path = _state_path(root, cfg)
    if not path.is_file():
        return {"files": {}, "pending": None, "current": None}
    return json.loads(path.read_text())


def _write_state(root: Path, cfg: ContinualConfig, state: dict[str, Any]) -> None:
    write_json_atomic(_state_path(root, cfg), state)


def new_files(root: Path, cfg: ContinualConfig) -> list[Path]:
    """Data files in the incoming folder whose content was not ingested before, oldest first."""
    incoming = root / cfg.incoming_dir
    if not incoming.is_dir():
        return []
    known = {entry["sha256"] for entry in read_state(root, cfg)["files"].values()}
    found = [p for p in incoming.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES]
    ignored = sorted(
        p.name for p in incoming.iterdir() if p.is_file() and p not in found and not p.name.startswith(".")
    )
    if ignored:
        log.warning("continual: %s: ignoring %s (not a data file; expected a suffix among %s)",
                    incoming, ", ".join(ignored), sorted(FILE_SUFFIXES))  # fmt: skip
    return sorted((p for p in found if _sha256(p) not in known), key=lambda p: (p.stat().st_mtime, p.name))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one incoming file. Strings, lists and mappings (a conversation) stay as they are, nulls stay
    null; numbers and booleans become strings (the record schema's fields are text or messages)."""
    kind = FILE_SUFFIXES[path.suffix.lower()]
    if kind == "jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    elif kind == "csv":
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    if not rows:
        raise DataError(f"{path}: no rows; expected at least one")
    return [
        {k: (v if v is None or isinstance(v, (str, list, dict)) else str(v)) for k, v in row.items()} for row in rows
    ]


def _read_store(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier version of the domain's data (JSON Lines; Parquet from before JSON Lines)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ingest(root: Path, files: list[Path], cfg: ContinualConfig) -> Ingested:
    """Append the files' rows to the domain's data, version it with DVC and register it in params.yaml.

    The caller holds the workspace lock: params.yaml and dvc.yaml are written here.
    """
    folder = root / cfg.store_dir / cfg.domain
    previous = sorted([*folder.glob("*.jsonl"), *folder.glob("*.parquet")]) if folder.is_dir() else []
    rows = [row for old in previous for row in _read_store(old)]
    for path in files:
        rows.extend(_read_rows(path))
    data = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    version = hashlib.sha256(data.encode()).hexdigest()[:12]

    # One file per version, named by content: the params path changes with the data, so DVC sees
    # `prepare` as stale through the `data` params and the file is a dep of prepare (posttrain.spec).
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{version}.jsonl"
    write_text_atomic(target, data)
    for old in previous:
        if old != target:
            old.unlink()  # the old version stays in DVC's cache and in git history of the .dvc file
    done = subprocess.run(
        dag.dvc_command("add", str(folder.relative_to(root))), cwd=root, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise PipelineError(f"dvc add {folder.relative_to(root)} failed: {done.stderr.strip() or done.stdout.strip()}")

    relative = target.relative_to(root).as_posix()
    domain = {"kind": "file", "path": relative, "format": "jsonl"}
    if cfg.columns:
        domain["columns"] = dict(cfg.columns)
    overrides = [f"data.domains.{cfg.domain}={json.dumps(domain)}"]
    if cfg.domain not in load_params(root / "params.yaml").mixtures["cpt"].weights:
        overrides.append(f"mixtures.cpt.weights.{cfg.domain}={cfg.weight}")
    dag.apply_overrides(root, overrides)
    # The versioned file is a dep of `prepare` (posttrain.spec): dvc.yaml is written from the new params.
    sync_dvc_yaml(load_params(root / "params.yaml"), root, if_managed=True)

    state = read_state(root, cfg)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for path in files:
        state["files"][path.name] = {"sha256": _sha256(path), "ingested_at": now, "version": version}
    state["current"] = {"version": version, "path": relative, "rows": len(rows)}
    state["pending"] = version
    _write_state(root, cfg, state)
    return Ingested([p.name for p in files], version, relative, len(rows))


def mark_done(root: Path, cfg: ContinualConfig) -> None:
    state = read_state(root, cfg)
    state["pending"] = None
    _write_state(root, cfg, state)


@task(name="ingest", cache_policy=NO_CACHE, persist_result=False)
def ingest_task(root: str) -> Ingested:
    """New files -> versioned data + params; or an earlier unfinished ingest; or nothing."""
    project = Path(root)
    cfg = load_params(project / "params.yaml").orchestration.continual
    files = new_files(project, cfg)
    if files:
        return ingest(project, files, cfg)
    state = read_state(project, cfg)
    if state.get("pending"):
        current = state["current"]
        return Ingested([], current["version"], current["path"], current["rows"], pending=True)
    return Ingested()


def load_promotion(spec: str) -> Any:
    """`module:function` -> the function (default: posttrain.tracking.registry.promote)."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise PipelineError(f"promotion {spec!r} cannot be loaded ({error}); expected 'module:function'") from None


@task(name="promote", cache_policy=NO_CACHE, persist_result=False)
def promote_task(root: str, promote: str) -> Any:
    project = Path(root)
    return load_promotion(promote)(load_params(project / "params.yaml"), project)


@flow(name="continual", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=16))
def continual_flow(
    root: str = ".",
    stages: list[str] | None = None,
    promote: str | None = DEFAULT_PROMOTE,
    wait: float = 600.0,
) -> dict[str, Any] | State:
    """Ingest new data, rerun the pipeline (all stages, or `stages` with their upstream), then promote.

    `promote`: the promotion function as `module:function`, called as promote(params, root); None skips it.
    `wait`: seconds to wait for another pipeline run in the same workspace to finish.
    """
    project = Path(root).resolve()
    try:
        with pipeline_lock(project, wait_seconds=wait):
            return _continual(project, stages, promote)
    except PipelineError as error:
        return Failed(message=str(error))


def _continual(project: Path, stages: list[str] | None, promote: str | None) -> dict[str, Any] | State:
    logger = get_run_logger()
    cfg = load_params(project / "params.yaml").orchestration.continual
    found = ingest_task(str(project))
    if not found.version:
        logger.info("continual: no new data in %s; nothing to do", project / cfg.incoming_dir)
        return {"new_files": [], "ran": False}
    if found.pending:
        logger.info("continual: no new files; finishing the unfinished ingest of version %s", found.version)
    else:
        logger.info("continual: ingested %s -> %s (%d rows)", ", ".join(found.files), found.path, found.rows)
    result = execute_pipeline(project, stages, echo=logger.info)
    logger.info(result.summary())
    if result.failed:
        return failure_state(result)
    decision = None
    if promote:
        try:
            outcome = promote_task(str(project), promote)
        except Exception as error:  # the promotion's own message is what the user needs
            return Failed(message=f"promotion: {error}")
        # posttrain.tracking.registry.promote returns a PromotionResult; a refusal is a decision, not a failure.
        decision = outcome.summary() if callable(getattr(outcome, "summary", None)) else outcome
        logger.info("continual: promotion: %s", decision)
    mark_done(project, cfg)
    return {
        "new_files": found.files,
        "version": found.version,
        "ran": True,
        "stages": result.outcomes,
        "promotion": decision,
    }


def ensure_process_pool(name: str) -> None:
    """Create a process work pool named `name` unless it exists (on the configured Prefect server)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    # The worker type's default job template, as `prefect work-pool create --type process` uses.
    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
        except ObjectAlreadyExists:
            pass


def deploy_continual(
    root: Path, cron: str, pool: str = DEFAULT_POOL, name: str = "continual", serve: bool = False
) -> str:
    """Register the continual flow as a cron deployment; returns the deployment's id.

    Default: a deployment on a process work pool of the Prefect server in PREFECT_API_URL; run
    its work with `prefect worker start --pool <pool>`. serve=True: `flow.serve` in this process
    instead (blocks; the schedule runs while it lives).
    """
    parameters = {"root": str(root)}
    if serve:
        continual_flow.serve(name=name, cron=cron, parameters=parameters)
        return name
    ensure_process_pool(pool)
    # The code comes from the folder holding flows/ (local storage: the worker runs it from there);
    # `root` is the project whose params.yaml and dvc.yaml the runs use (usually the same folder).
    code = Path(__file__).resolve().parents[1]
    source = continual_flow.from_source(source=str(code), entrypoint="flows/continual.py:continual_flow")
    deployment_id = source.deploy(
        name=name, work_pool_name=pool, cron=cron, parameters=parameters, print_next_steps=False, ignore_warnings=True
    )
    return str(deployment_id)
