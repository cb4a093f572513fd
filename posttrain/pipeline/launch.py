"""Run trainer stages under `accelerate launch` without changing the stage code or dvc.yaml.

dvc.yaml always calls `python -m stages.<name>`. When params.yaml says

    compute:
      launcher: accelerate
      accelerate_config: configs/accelerate/fsdp.yaml

`posttrain.pipeline.entry.stage_main` of a trainer stage re-executes the same module under
`accelerate launch --config_file <file> -m stages.<name> --params <abs> --root <abs>` and exits with
its status. The re-executed processes see the launcher's environment (RANK, LOCAL_RANK, ...) and run
the stage normally; only global rank 0 writes outputs, lineage, metrics and MLflow records.

Importing this module stays cheap (no torch): stage_main calls it before any heavy import.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from posttrain.config import TRAINING_STAGES, ComputeConfig
from posttrain.errors import ParamsError

log = logging.getLogger(__name__)

# Set on the processes we start, so a stage never re-launches itself twice.
LAUNCHED_ENV = "POSTTRAIN_LAUNCHED"
# A file where a launched rank records its own exit status: `accelerate launch` reports any failing
# rank as 1, which would turn "out of memory, do not retry" (3) into an ordinary, retried failure.
EXIT_STATUS_ENV = "POSTTRAIN_EXIT_STATUS_FILE"
# Any of these means a launcher already started this process: torchrun / accelerate's multi-process
# launchers set RANK/LOCAL_RANK/WORLD_SIZE, its single-process launcher sets ACCELERATE_* variables,
# mpirun sets the OMPI_/PMI_ ranks.
_LAUNCHER_VARS = (
    LAUNCHED_ENV,
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_DYNAMO_BACKEND",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
)


def inside_launcher(env: Mapping[str, str] | None = None) -> bool:
    """True when this process was started by accelerate, torchrun, mpirun or by `relaunch`."""
    env = os.environ if env is None else env
    return any(env.get(name) not in (None, "") for name in _LAUNCHER_VARS)


def should_relaunch(stage: str, compute: ComputeConfig, env: Mapping[str, str] | None = None) -> bool:
    return stage in TRAINING_STAGES and compute.launcher == "accelerate" and not inside_launcher(env)


def resolve_accelerate_config(compute: ComputeConfig, root: Path) -> Path:
    """compute.accelerate_config as an existing file (relative paths are relative to the project root)."""
    if not compute.accelerate_config:
        raise ParamsError("compute.launcher is 'accelerate' but compute.accelerate_config is not set")
    path = Path(compute.accelerate_config)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise ParamsError(
            f"compute.accelerate_config: got {compute.accelerate_config!r}, expected an accelerate config file "
            f"({path} does not exist; see configs/accelerate/)"
        )
    return path


def report_exit_status(code: int, env: Mapping[str, str] | None = None) -> None:
    """Called by a launched rank just before it exits with `code`, so `relaunch` can pass it on."""
    env = os.environ if env is None else env
    path = env.get(EXIT_STATUS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:  # one line per failing rank
            handle.write(f"{code}\n")


def launched_exit_status(returncode: int, status_file: Path) -> int:
    """The launch's status, with a rank's not-retryable status (the highest it reported) restored."""
    if returncode == 0 or not status_file.is_file():
        return returncode
    reported = [int(line) for line in status_file.read_text().split() if line.strip().isdigit()]
    return max(reported) if reported else returncode


def accelerate_command(stage: str, config_file: Path, stage_args: list[str]) -> list[str]:
    """`accelerate launch` as a module of this interpreter, so the venv's accelerate is the one used."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config_file),
        "-m", f"stages.{stage}",
        *stage_args,
    ]  # fmt: skip


def relaunch(stage: str, compute: ComputeConfig, root: Path, params_path: Path, *, debug: bool = False) -> int:
    """Run the stage under `accelerate launch`; return its exit status.

    SIGTERM/SIGINT are forwarded to the whole process group of the launch, so every rank gets the
    signal and the stage's Preemption callback saves a checkpoint, as in a single-process run.
    """
    config_file = resolve_accelerate_config(compute, root)
    stage_args = ["--params", str(params_path.resolve()), "--root", str(root.resolve())]
    if debug:
        stage_args.append("--debug")
    cmd = accelerate_command(stage, config_file, stage_args)
    env = dict(os.environ)
    env[LAUNCHED_ENV] = "1"
    status_fd, status_name = tempfile.mkstemp(prefix=f"posttrain-{stage}-exit-")
    os.close(status_fd)
    env[EXIT_STATUS_ENV] = status_name
    # The children import `stages.<name>` and `posttrain` from the project, whatever their cwd.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root.resolve()), env.get("PYTHONPATH", "")) if p)
    log.info("stage %s: launching through accelerate (%s)", stage, config_file)
    process = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return launched_exit_status(process.wait(), Path(status_name))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        Path(status_name).unlink(missing_ok=True)
