"""The one command-line entry shared by every stage (`python -m stages.<name>`), which dvc.yaml calls.

It loads and validates params.yaml, sets up logging, runs the stage's plain function, and records
the run in MLflow. Stage functions themselves know nothing of DVC, Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import Params, load_params
from posttrain.errors import PipelineError
from posttrain.layout import Layout, find_root

log = logging.getLogger("posttrain")


@dataclass
class StageResult:
    """What a stage produced, for tracking: its metrics and, for model stages, the model folder."""

    metrics: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None
    artifacts: list[Path] = field(default_factory=list)


StageFunction = Callable[[Params, Layout], StageResult]


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def stage_main(stage: str, run: StageFunction, argv: list[str] | None = None) -> None:
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
        if params.tracking.enabled:
            from posttrain import tracking  # cheap: mlflow itself is imported only when needed

            # A configured tracking server that is down must fail the stage before any training.
            tracking.check_tracking_server(params, root)
        log.info("stage %s: starting", stage)
        result = run(params, Layout(root))
        seconds = time.perf_counter() - started
        log.info("stage %s: finished in %.1f s", stage, seconds)
        if params.tracking.enabled:
            tracking.record_stage(stage, params, Layout(root), result, seconds=seconds)
    except PipelineError as error:
        if args.debug:
            raise
        print(f"error: stage {stage}: {error}", file=sys.stderr)
        sys.exit(1)
