"""The one command-line entry shared by every stage (`python -m stages.<name>`), which dvc.yaml calls.

It loads and validates params.yaml, sets up logging, runs the stage's plain function, and records
the run in MLflow. Stage functions themselves know nothing of DVC, Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import time
from pathlib import Path

from posttrain.config import load_params
from posttrain.errors import PipelineError, resource_error
from posttrain.layout import Layout, find_root
from posttrain.pipeline import launch
from posttrain.runtime import is_main_process
from posttrain.stage import StageFunction
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


def stage_main(stage: str, run: StageFunction, argv: list[str] | None = None) -> None:
    """The process entry of `python -m stages.<stage>`: it ends the process (exit status 0, 1 or 3)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"Run the '{stage}' stage.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=None, help="project root (default: nearest folder with dvc.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for pipeline errors")
    args = parser.parse_args(argv)
    setup_logging()
    root = Path(args.root).resolve() if args.root else find_root()
    params_path = Path(args.params)
    if not params_path.is_absolute():
        params_path = root / params_path
    started = time.perf_counter()
    try:
        params = load_params(params_path)
        if launch.should_relaunch(stage, params.compute):
            # compute.launcher: accelerate -> run this same module under `accelerate launch`.
            sys.exit(launch.relaunch(stage, params.compute, root, params_path, debug=args.debug))
        # Other ranks of a distributed run train, but write nothing and track nothing.
        track = params.tracking.enabled and is_main_process()
        if track:
            # A configured tracking server that is down must fail the stage before any training.
            client.check_tracking_server(params, root)
        log.info("stage %s: starting", stage)
        result = run(params, Layout(root))
        seconds = time.perf_counter() - started
        log.info("stage %s: finished in %.1f s", stage, seconds)
        if track:
            runs.record_stage(stage, params, Layout(root), result, seconds=seconds)
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
