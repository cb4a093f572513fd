"""MLflow tracking: one parent run per pipeline run, one child run per stage, models into the registry.

`posttrain.pipeline.entry.stage_main` calls `record_stage` after a stage function returns, so stages know
nothing of MLflow. Where the runs go:

- tracking URI: `tracking.tracking_uri` in params.yaml, else the `MLFLOW_TRACKING_URI` environment
  variable, else an embedded SQLite store `sqlite:///<root>/mlflow.db` with artifacts in
  `<root>/mlruns` (no server to run).
- parent run ("the pipeline run"): keyed by the tag `posttrain.pipeline_key`. The key is the
  value of `POSTTRAIN_PIPELINE_RUN_ID` when the Prefect flow sets it (one flow run = one parent;
  the variable may also hold the MLflow run id returned by `start_pipeline_run`). With plain
  `dvc repro` the key is `git:<commit>[+dirty]/params:<hash of the whole params.yaml>`, so every
  stage DVC runs for one commit and one configuration lands under the same parent, and changing a
  param or committing starts a new parent that holds exactly the stages DVC re-ran.
- child run per stage: the params keys the stage declares in dvc.yaml (redacted), scalar metrics,
  step series (`log_history`, `continual_eval`), the metrics JSON, lineage.json and plots as
  artifacts, lineage as tags. Model stages register their folder (see `posttrain.tracking.registry`).

`import mlflow` stays inside functions: the CLI imports this module for `--help`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import Params, params_hash
from posttrain.errors import TrackingError
from posttrain.io import json_hash, redact
from posttrain.layout import Layout
from posttrain.lineage import git_state, library_versions, read_lineage
from posttrain.scoring.report import EvalReport
from posttrain.spec import effective_values, mlflow_key, recipe_specs
from posttrain.stage import flatten, is_number
from posttrain.tracking import registry
from posttrain.tracking.client import TAG, connect, experiment_id, lineage_tags, record_wait_seconds, retry_locked

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from posttrain.stage import StageResult

log = logging.getLogger("posttrain.tracking.runs")

PIPELINE_ENV = "POSTTRAIN_PIPELINE_RUN_ID"
PIPELINE_KEY_TAG = TAG + "pipeline_key"
# Step series: logged as MLflow metric steps, not as scalars (trajectories of curriculum and online mixing too).
SERIES_KEYS = (
    "log_history",
    "continual_eval",
    "curriculum_trajectory",
    "mixing_trajectory",
    "hybrid_trajectory",
    "rollout_steps",  # GRPO's per-step time split (posttrain.training.rollout_timing)
)


# --------------------------------------------------------------------------- flattening


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]  # MLflow's limit on a param value


_BAD_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_name(name: str) -> str:
    return _BAD_METRIC_CHARS.sub("_", name)[:250]


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Every number in a metrics JSON except the step series, flattened to dotted names."""
    flat = flatten({key: value for key, value in metrics.items() if key not in SERIES_KEYS})
    return {metric_name(key): float(value) for key, value in flat.items() if is_number(value)}


def _points(node: Any, prefix: str) -> Iterable[tuple[str, float, int]]:
    """Tolerant reader of a step series: a list of {step, <metric>: number | {name: number}, domain?},
    a list of numbers or [step, value] pairs, parallel lists {steps: [...], <metric>: [...]}, or a
    mapping of names to any of these."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            if is_number(item):
                yield prefix, float(item), index
            elif isinstance(item, (list, tuple)) and len(item) == 2 and all(is_number(x) for x in item):
                yield prefix, float(item[1]), int(item[0])
            elif isinstance(item, dict):
                step = item.get("step", item.get("global_step", index))
                if not is_number(step):
                    continue
                name = f"{prefix}/{item['domain']}" if isinstance(item.get("domain"), str) else prefix
                for key, value in flatten({k: v for k, v in item.items() if k not in ("step", "global_step")}).items():
                    if is_number(value):
                        yield f"{name}/{key.replace('.', '/')}", float(value), int(step)
    elif isinstance(node, dict):
        steps = node.get("steps", node.get("step"))
        if isinstance(steps, list) and all(is_number(s) for s in steps):
            for key, values in node.items():
                if key in ("steps", "step") or not isinstance(values, list) or len(values) != len(steps):
                    continue
                for step, value in zip(steps, values, strict=True):
                    if is_number(value):
                        yield f"{prefix}/{key}", float(value), int(step)
            return
        for key, value in node.items():
            yield from _points(value, f"{prefix}/{key}")


def series_metrics(metrics: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) for the Trainer's log history (as `train/<key>`) and continual evaluation."""
    points: list[tuple[str, float, int]] = []
    for entry in metrics.get("log_history") or []:
        if isinstance(entry, dict) and is_number(entry.get("step")):
            for key, value in entry.items():
                if key != "step" and is_number(value):
                    points.append((f"train/{key}", float(value), int(entry["step"])))
    for key in SERIES_KEYS[1:]:
        if metrics.get(key) is not None:
            points.extend(_points(metrics[key], key))
    return [(metric_name(name), value, step) for name, value, step in points]


# --------------------------------------------------------------------------- parent run


def stage_params(params: Params, root: Path, stage: str) -> dict[str, str]:
    """What MLflow records as the stage run's params: the values it ran with, by the params keys of its
    spec (a variant's own merged section and seed), flattened and redacted. A name outside the recipe's
    chain (a stage run by hand) records its own section."""
    specs = recipe_specs(params, root)
    if stage in specs:
        values = effective_values(specs[stage], params)
    else:
        values = {stage: getattr(params, stage).model_dump(mode="json")} if stage in params.model_fields else {}
    return {name: _param_value(value) for name, value in flatten(redact(values)).items()}


def pipeline_key(params: Params, root: Path) -> str:
    """The parent run's key: the flow's id when it set one, else commit + dirty flag + params hash."""
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV]
    git = git_state(root)
    commit = (git.get("commit") or "nogit")[:12] + ("+dirty" if git.get("dirty") and _code_dirty(root) else "")
    return f"git:{commit}/params:{params_hash(params)}"


def _code_dirty(root: Path) -> bool:
    """Uncommitted changes other than dvc.lock: DVC rewrites dvc.lock after every stage, which would
    otherwise flip the key (and start a new parent) in the middle of one `dvc repro`."""
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def _log_params(client: MlflowClient, run_id: str, values: dict[str, str]) -> None:
    from mlflow.entities import Param

    # MLflow refuses '@' in keys; variants (`mixtures.sft@arith`) are logged as `mixtures.sft:arith`.
    items = [Param(mlflow_key(key)[:250], value) for key, value in sorted(values.items())]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        retry_locked(client.log_batch, run_id, params=items[start : start + 100])


def _runs_with_key(client: MlflowClient, experiment: str, key: str) -> list[Any]:
    quoted = key.replace("'", "\\'")
    runs = retry_locked(
        client.search_runs,
        [experiment],
        filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{quoted}' and tags.`{TAG}kind` = 'pipeline'",
        max_results=50,
    )
    # Oldest first, run id as tie-break: two stages racing to create a parent agree on the winner.
    return sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))


def start_pipeline_run(params: Params, root: Path, key: str | None = None, name: str | None = None) -> str:
    """Find or create the parent run for `key` (default: `pipeline_key`); returns its MLflow run id.

    The Prefect flow calls this once before launching stage tasks and exports the returned id (or
    its own key) as POSTTRAIN_PIPELINE_RUN_ID, so parallel stages never race to create the parent.
    """
    client = connect(params, root)
    return _pipeline_run(
        client, experiment_id(client, params), params, Path(root), key or pipeline_key(params, root), name
    )


def _pipeline_run(
    client: MlflowClient, experiment: str, params: Params, root: Path, key: str, name: str | None = None
) -> str:
    from mlflow.exceptions import MlflowException

    if re.fullmatch(r"[0-9a-f]{32}", key):  # the flow exported an MLflow run id
        try:
            run = retry_locked(client.get_run, key)
            if run.data.tags.get(f"{TAG}kind") == "pipeline":
                return key
        except MlflowException:
            pass
    existing = _runs_with_key(client, experiment, key)
    if existing:
        return existing[0].info.run_id
    git = git_state(root)
    run = retry_locked(
        client.create_run,
        experiment,
        run_name=name or f"pipeline {key[:60]}",
        tags={
            PIPELINE_KEY_TAG: key,
            f"{TAG}kind": "pipeline",
            f"{TAG}git_commit": str(git.get("commit")),
            f"{TAG}git_dirty": str(git.get("dirty")),
            f"{TAG}params_hash": params_hash(params),
        },
    )
    winner = _runs_with_key(client, experiment, key)[0].info.run_id
    if winner != run.info.run_id:  # lost a race with a parallel stage: use the other parent
        retry_locked(client.delete_run, run.info.run_id)
        return winner
    full = {key_: _param_value(value) for key_, value in flatten(redact(params.model_dump(mode="json"))).items()}
    _log_params(client, run.info.run_id, full)
    return run.info.run_id


def finish_pipeline_run(params: Params, root: Path, run_id: str, status: str = "FINISHED") -> None:
    """Mark the parent run FINISHED or FAILED (the flow calls this when the DAG is done)."""
    client = connect(params, root)
    retry_locked(client.set_terminated, run_id, status)


# --------------------------------------------------------------------------- one stage


@dataclass
class StageRecord:
    """What `record_stage` wrote: ids to find it again, and its own cost."""

    run_id: str
    parent_run_id: str
    registered_model: str | None = None
    model_version: str | None = None
    seconds: float = 0.0


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TrackingError(f"{path}: metrics file is not valid JSON ({error})") from None
    return data if isinstance(data, dict) else {"value": data}


def _stage_files(stage: str, layout: Layout, result: StageResult) -> list[tuple[Path, str]]:
    """(file or folder, artifact path) to attach to the stage's run."""
    files: list[tuple[Path, str]] = []
    for path in (layout.metrics(stage), layout.artifacts / "metrics" / "eval.json" if stage == "evaluate" else None):
        if path is not None and path.is_file():
            files.append((path, "metrics"))
    if layout.plots.is_dir():
        for path in sorted(layout.plots.iterdir()):
            if path.name == stage or path.name.startswith((f"{stage}.", f"{stage}_", f"{stage}-")):
                files.append((path, "plots"))
    for path in result.artifacts:
        path = Path(path)
        if not path.exists() or any(path.resolve() == known.resolve() for known, _ in files):
            continue
        if result.model_dir is not None and path.resolve() == Path(result.model_dir).resolve():
            continue  # the model goes to the registry, not a second time as a plain artifact
        files.append((path, "plots" if path.resolve().is_relative_to(layout.plots.resolve()) else "outputs"))
    return files


def record_stage(stage: str, params: Params, layout: Layout, result: StageResult, seconds: float) -> StageRecord:
    """Record one finished stage as a child run of the pipeline run; register its model, if any.

    Raises TrackingError (a PipelineError) when MLflow cannot be written, naming the store.
    """
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    started = time.perf_counter()
    root = layout.root
    try:
        # The stage's work is done: a tracking server that is restarting is waited for, within bounds.
        client = connect(params, root, wait=record_wait_seconds())
    except TrackingError as error:
        raise TrackingError(
            f"the stage finished, but {error} Its outputs are written and not recorded, so DVC does not lock "
            f"them: rerun it (dvc repro {stage}) once the server answers; a trainer stage resumes its final "
            "checkpoint and trains 0 steps"
        ) from None
    try:
        experiment = experiment_id(client, params)
        parent = _pipeline_run(client, experiment, params, root, pipeline_key(params, root))
        model_dir = Path(result.model_dir) if result.model_dir else None
        lineage = (read_lineage(model_dir) if model_dir else None) or {}
        git = lineage.get("git") or git_state(root)
        logged_params = stage_params(params, root, stage)
        tags = {
            "mlflow.parentRunId": parent,
            f"{TAG}kind": "stage",
            f"{TAG}dvc_stage": stage,
            f"{TAG}git_commit": str(git.get("commit")),
            f"{TAG}git_dirty": str(git.get("dirty")),
            f"{TAG}params_hash": params_hash(logged_params),
            f"{TAG}prepared_manifest_hash": str(json_hash(layout.prepared / "manifest.json")),
            f"{TAG}tracking_uri": redact(client.tracking_uri),
            **{f"{TAG}version.{k}": v for k, v in library_versions().items()},
            **lineage_tags(lineage),  # a model's own record wins over the values computed here
        }
        inputs = registry.parent_versions(client, params, lineage)
        if inputs:
            tags[f"{TAG}input_models"] = ", ".join(inputs)
        run = retry_locked(client.create_run, experiment, run_name=stage, tags=tags)
        run_id = run.info.run_id
        record = StageRecord(run_id=run_id, parent_run_id=parent)
        try:
            _log_params(client, run_id, logged_params)
            metrics_file = layout.artifacts / "metrics" / "eval.json" if stage == "evaluate" else layout.metrics(stage)
            evaluation = _read_json(metrics_file) if stage == "evaluate" else {}
            metrics = {**result.metrics, **_read_json(layout.metrics(stage))}
            # eval.json's flat `summary` is the part meant for MLflow (docs/eval-schema.md); the
            # nested rest goes to the registry versions, not into hundreds of run metrics.
            metrics.update(evaluation.get("summary") if isinstance(evaluation.get("summary"), dict) else evaluation)
            now = int(time.time() * 1000)
            points = [
                Metric(name, value, now, 0) for name, value in scalar_metrics(metrics).items() if not math.isinf(value)
            ]
            points += [Metric(name, value, now, step) for name, value, step in series_metrics(metrics)]
            points.append(Metric("stage_seconds", float(seconds), now, 0))
            for start in range(0, len(points), 1000):  # MLflow's batch limit
                retry_locked(client.log_batch, run_id, metrics=points[start : start + 1000])
            for path, artifact_path in _stage_files(stage, layout, result):
                log_artifact = client.log_artifacts if path.is_dir() else client.log_artifact
                retry_locked(
                    log_artifact, run_id, str(path), artifact_path + ("/" + path.name if path.is_dir() else "")
                )
            if model_dir is not None:
                if lineage:
                    retry_locked(client.log_artifact, run_id, str(model_dir / "lineage.json"), "lineage")
                version = registry.register_stage_model(client, params, root, stage, run_id, model_dir, lineage)
                record.registered_model, record.model_version = version.name, str(version.version)
                retry_locked(
                    client.log_batch,
                    run_id,
                    tags=[
                        RunTag(f"{TAG}registered_model", version.name),
                        RunTag(f"{TAG}registered_version", str(version.version)),
                    ],
                )
            if stage == "evaluate":
                registry.record_evaluation(
                    client, params, layout, run_id, EvalReport.parse(evaluation, str(metrics_file))
                )
            record.seconds = time.perf_counter() - started
            retry_locked(
                client.log_batch,
                run_id,
                metrics=[Metric("tracking_seconds", record.seconds, int(time.time() * 1000), 0)],
            )
            retry_locked(client.set_terminated, run_id, "FINISHED")
            # The parent ends with its latest stage; a later stage of the same key reopens nothing,
            # it only adds a child (the parent's end time then moves on).
            retry_locked(client.set_terminated, parent, "FINISHED")
        except BaseException:
            try:
                client.set_terminated(run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise
    except MlflowException as error:
        raise TrackingError(
            f"recording in MLflow ({redact(client.tracking_uri)}) failed: {redact(str(error))}"
            # The server proxies artifacts: its 5xx there means the store behind it (S3) failed, not MLflow.
            + (
                "; the server could not store the artifacts: check its artifact store (S3) and its log"
                if "mlflow-artifacts" in str(error)
                else ""
            )  # fmt: skip
        ) from None
    log.info(
        "stage %s: recorded in MLflow run %s (parent %s)%s in %.2f s",
        stage,
        record.run_id,
        record.parent_run_id,
        f", registered {record.registered_model} version {record.model_version}" if record.model_version else "",
        record.seconds,
    )
    return record
