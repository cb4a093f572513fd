"""The one command-line entry shared by every stage (`python -m stages.<name>`), which dvc.yaml calls.

It loads and validates params.yaml, sets up logging, runs the stage's plain function, and records
the run in MLflow. Stage functions themselves know nothing of DVC, Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from posttrain.config import Params, parse_params, read_yaml
from posttrain.errors import ParamsChangedError, ParamsError, PipelineError, TrackingError, resource_error
from posttrain.layout import Layout, find_root
from posttrain.lineage import add_environment
from posttrain.pipeline import launch
from posttrain.runtime import is_main_process
from posttrain.spec import StageSpec, check_declared, declared_values, is_absent, stage_spec, variant_name
from posttrain.stage import StageFunction, StageResult
from posttrain.tracking import client, runs

log = logging.getLogger("posttrain")


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def exit_process(code: int) -> None:
    """End the stage's process without the interpreter's module teardown.

    Measured after a trainer stage: 1.7-1.9 s between the last atexit handler and the process's end
    (freeing torch, transformers, tokenizers, mlflow/SQLAlchemy, ...), paid by every stage run, which
    DVC waits for. Everything the stage writes is closed by then (atomic writes, checkpoint markers,
    MLflow calls are synchronous); the atexit handlers and log flushing still run.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_params_unchanged(spec: StageSpec, started_with: dict[str, Any], params_path: Path) -> None:
    """Fail, naming the key, when params.yaml no longer holds the values the stage read at its start.

    DVC records params into dvc.lock from the file as it is when the stage ends; an edit made while
    the stage ran would give a lock describing a model that was not trained with it. Exiting 1
    here keeps DVC from writing the lock.
    """
    try:
        now = declared_values(spec, read_yaml(params_path))
    except PipelineError as error:
        raise ParamsChangedError(f"{params_path} changed while the stage ran and no longer loads: {error}") from None
    changed = [key for key in started_with if now.get(key) != started_with[key]]
    if changed:

        def shown(value: Any) -> str:
            return "(absent)" if is_absent(value) else repr(value)

        details = "; ".join(f"{key}: {shown(started_with[key])} -> {shown(now.get(key))}" for key in changed[:5])
        raise ParamsChangedError(
            f"{params_path} changed while the stage ran ({details}); the outputs were made with the old "
            f"values, so DVC must not record the new ones. Rerun the stage (dvc repro {spec.dvc_name})"
        )


def variant_run(params: Params, stage: str, variant: str, run: Any) -> tuple[str, StageFunction]:
    """`<stage>@<variant>` and the stage function bound to that name (it takes a `stage` argument)."""
    name = variant_name(stage, variant)
    if name not in params.variant_names():
        declared = sorted(params.variants.get(stage, {}))
        raise ParamsError(f"variants.{stage}.{variant}: not declared in params.yaml; declared: {declared}")
    return name, functools.partial(run, stage=name)


def record(stage: str, params: Params, layout: Layout, result: StageResult, seconds: float) -> None:
    """Record the finished stage in MLflow; a failure there is one TrackingError line, not a store's traceback."""
    try:
        runs.record_stage(stage, params, layout, result, seconds=seconds)
    except PipelineError:
        raise
    except Exception as error:  # MLflow, SQLAlchemy, HTTP: whatever the configured store raises
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise TrackingError(
            f"recording the run in MLflow failed after the stage finished ({type(error).__name__}: {first_line}); "
            "its outputs are written. Fix tracking.tracking_uri (or set tracking.enabled: false) and rerun the "
            "stage: a trainer stage resumes its final checkpoint and trains 0 steps (--debug shows the traceback)"
        ) from error


def stage_main(stage: str, run: StageFunction, argv: list[str] | None = None) -> None:
    """The process entry of `python -m stages.<stage>`: it ends the process (exit status 0, 1 or 3)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"Run the '{stage}' stage.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=None, help="project root (default: nearest folder with dvc.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for pipeline errors")
    parser.add_argument("--variant", default=None, help="run the variant `variants.<stage>.<name>` of this stage")
    args = parser.parse_args(argv)
    setup_logging()
    root = Path(args.root).resolve() if args.root else find_root()
    params_path = Path(args.params)
    if not params_path.is_absolute():
        params_path = root / params_path
    started = time.perf_counter()
    try:
        raw = read_yaml(params_path)
        params = parse_params(raw, source=str(params_path))
        if launch.should_relaunch(stage, params.compute):
            # compute.launcher: accelerate -> run this same module under `accelerate launch`.
            code = launch.relaunch(stage, params.compute, root, params_path, debug=args.debug, variant=args.variant)
            sys.exit(code)
        if args.variant is not None:
            stage, run = variant_run(params, stage, args.variant, run)
        spec = stage_spec(params, root, stage)
        check_declared(spec, root)  # dvc.yaml declares what the stage reads, or DVC would not rerun it
        started_with = declared_values(spec, raw)
        # Other ranks of a distributed run train, but write nothing and track nothing.
        track = params.tracking.enabled and is_main_process()
        if track:
            # A configured tracking server that is down must fail the stage before any training.
            client.check_tracking_server(params, root)
        log.info("stage %s: starting", stage)
        result = run(params, Layout(root))
        if is_main_process():
            add_environment(Layout(root).metrics("eval" if stage == "evaluate" else stage))
        seconds = time.perf_counter() - started
        log.info("stage %s: finished in %.1f s", stage, seconds)
        check_params_unchanged(spec, started_with, params_path)  # before tracking records it
        if track:
            record(stage, params, Layout(root), result, seconds)
            check_params_unchanged(spec, started_with, params_path)
    except Exception as error:
        # Out of memory / disk outside the training loop (model build, saving, evaluation) too.
        known = error if isinstance(error, PipelineError) else resource_error(error, stage)
        if known is None or args.debug:
            raise
        print(f"error: stage {stage}: {known}", file=sys.stderr)
        code = getattr(known, "exit_code", 1)
        launch.report_exit_status(code)  # under `accelerate launch`: the parent passes 3 on instead of 1
        sys.exit(code)
    exit_process(0)
