"""The pipeline flow: each dvc.yaml stage as one Prefect task, in the order DVC's graph gives.

DVC stays the judge of what is stale and owns the outputs and dvc.lock; Prefect adds retries,
concurrency of independent branches, a run history and schedules. Each task runs
`dvc repro --single-item <stage>` in a subprocess, so a stage's memory (GPU included) is freed when
it ends and the task does exactly what a plain `dvc repro` would do for that stage.

Results are not cached in Prefect (DVC decides staleness) and log_prints stays off (stage output
goes straight to the terminal, prefixed with the stage name).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from posttrain.config import Params, load_params
from posttrain.errors import EXIT_NOT_RETRYABLE, PipelineError, StageError
from posttrain.io import redact
from posttrain.pipeline import dag
from posttrain.pipeline.workspace import pipeline_lock
from posttrain.spec import foreach_group, sync_dvc_yaml

TAIL_LINES = 15
OK = ("ran", "unchanged", "restored", "cached")  # outcomes that let downstream stages start


class StageFailed(StageError):
    """A stage's command exited non-zero; the message starts with the stage's own error lines."""

    def __init__(self, stage: str, returncode: int, tail: list[str]) -> None:
        self.stage, self.returncode, self.tail = stage, returncode, tail
        # The stage's own `error: stage X: ...` lines (posttrain.pipeline.entry) first; DVC's generic
        # "failed to reproduce" line last, as context.
        own = [line for line in tail if line.startswith("error:")]
        rest = [line for line in tail if line not in own and not line.startswith("ERROR: failed to reproduce")]
        head = own or rest[-5:] or [f"stage {stage}: command failed"]
        context = [line for line in tail if line not in head]
        super().__init__(
            "\n".join(head)
            + f"\n(`dvc repro --single-item {stage}` exited {returncode}"
            + ("; other stderr lines:" + "".join(f"\n    {line}" for line in context) if context else "")
            + ")"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for Prefect's state storage
        return (StageFailed, (self.stage, self.returncode, self.tail))

    @property
    def retryable(self) -> bool:
        """False when the stage exited EXIT_NOT_RETRYABLE (out of memory / disk): the same rerun fails again.

        DVC exits 255 whatever the stage's status, but names it: "failed to run: <cmd>, exited with 3".
        """
        return not any(line.rstrip().endswith(f"exited with {EXIT_NOT_RETRYABLE}") for line in self.tail)


def _should_retry(task: Any, task_run: Any, state: State) -> bool:
    """Prefect retry condition: retry anything but a non-retryable stage failure."""
    error = state.data if isinstance(state.data, BaseException) else None
    return not (isinstance(error, StageFailed) and not error.retryable)


def check_prefect_api(timeout: float = 3.0) -> str | None:
    """Fail fast, before any stage runs, when PREFECT_API_URL names a server that does not answer.

    None when no URL is set (Prefect then starts its own ephemeral server on 127.0.0.1). Prefect's
    client would otherwise retry each request with backoff and fail deep inside the flow.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # something answered: a server is there
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise PipelineError(
            f"Prefect API {redact(url)} (PREFECT_API_URL) cannot be reached ({getattr(error, 'reason', error)}; "
            f"gave up after {time.perf_counter() - started:.1f} s). Start it (`prefect server start`), fix "
            "PREFECT_API_URL, unset it to use Prefect's ephemeral server, or run `posttrain run --no-prefect`."
        ) from None
    return url


def _pump(stream: IO[str], sink: IO[str], prefix: str, keep: deque[str] | None, seen: list[str]) -> None:
    for line in stream:
        line = line.rstrip("\n")
        sink.write(f"{prefix}{line}\n")
        sink.flush()
        if "didn't change, skipping" in line or "is cached - skipping" in line:
            seen.append(line)
        if keep is not None:
            keep.append(line)


def run_dvc_stage(root: Path, stage: str, force: bool = False) -> str:
    """`dvc repro --single-item <stage>` with its output streamed to the terminal.

    Returns what DVC did: "ran", "unchanged" (inputs identical after all) or "restored" (from
    DVC's run cache). Raises StageFailed with the last lines of stderr when the command fails.
    """
    cmd = dag.dvc_command("repro", "--single-item", stage, *(["--force"] if force else []))
    process = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    skipped: list[str] = []
    assert process.stdout is not None and process.stderr is not None
    pumps = [
        threading.Thread(target=_pump, args=(process.stdout, sys.stdout, f"[{stage}] ", None, skipped), daemon=True),
        threading.Thread(target=_pump, args=(process.stderr, sys.stderr, f"[{stage}] ", tail, skipped), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    returncode = process.wait()
    for pump in pumps:
        pump.join()
    if returncode != 0:
        raise StageFailed(stage, returncode, list(tail))
    if any("is cached" in line for line in skipped):
        return "restored"
    return "unchanged" if skipped else "ran"


@task(cache_policy=NO_CACHE, persist_result=False, log_prints=False, retry_condition_fn=_should_retry)
def dvc_stage(root: str, stage: str, force: bool = False) -> str:
    """One DVC stage. Retries rerun the same command (training stages resume from their checkpoint)."""
    started = time.perf_counter()
    outcome = run_dvc_stage(Path(root), stage, force=force)
    get_run_logger().info("stage %s: %s in %.1f s", stage, outcome, time.perf_counter() - started)
    return outcome


@dataclass
class PipelineResult:
    """Outcome per stage in run order: ran | unchanged | restored | cached | failed | skipped."""

    outcomes: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # failed stage -> its error message
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    def summary(self) -> str:
        lines = [f"  {stage:<16} {outcome}" for stage, outcome in self.outcomes.items()]
        return "\n".join(["pipeline:", *lines, f"  ({self.seconds:.1f} s)"])


def _retries(params: Params, stage: str) -> int:
    table = params.orchestration.retries
    # `mix@sft` can be set on its own or through its base name `mix`.
    return table.get(stage, table.get(foreach_group(stage), params.orchestration.default_retries))


def execute_pipeline(
    root: Path,
    stages: Iterable[str] | None = None,
    downstream: bool = False,
    force: bool = False,
    echo: Callable[[str], Any] = print,
) -> PipelineResult:
    """Run the selected stages as tasks of the current flow; call it from inside a flow.

    A stage starts once its upstream stages succeeded, at most `orchestration.max_parallel` at a
    time. Stages that are up to date (one `dvc status` up front) are reported "cached" without a
    subprocess. After a failure, stages below it are "skipped" and independent branches finish
    (like `dvc repro --keep-going`), so no finished work is lost.
    """
    started = time.perf_counter()
    params = load_params(root / "params.yaml")
    graph, statuses = dag.pipeline_status(root)
    order = dag.select(graph, stages, downstream=downstream)
    chosen = set(order)
    result = PipelineResult()
    pending = []
    for stage in order:
        if force or statuses[stage].stale:
            pending.append(stage)
        else:
            result.outcomes[stage] = "cached"
    echo(f"pipeline: {len(pending)} of {len(order)} stage(s) to run: {', '.join(pending) or 'none'}")

    futures: dict[str, PrefectFuture[str]] = {}
    running: dict[PrefectFuture[str], str] = {}
    limit = params.orchestration.max_parallel
    while pending or running:
        for stage in list(pending):
            upstream = graph[stage] & chosen
            bad = sorted(u for u in upstream if result.outcomes.get(u) in ("failed", "skipped"))
            if bad:
                pending.remove(stage)
                result.outcomes[stage] = "skipped"
                echo(f"pipeline: {stage} skipped: upstream stage {bad[0]} did not finish")
            elif len(running) < limit and all(result.outcomes.get(u) in OK for u in upstream):
                pending.remove(stage)
                task_for_stage = dvc_stage.with_options(
                    name=stage,
                    task_run_name=stage,
                    retries=_retries(params, stage),
                    retry_delay_seconds=params.orchestration.retry_delay_seconds,
                )
                # wait_for on finished futures: only so the Prefect UI draws the dependency edges.
                future = task_for_stage.submit(
                    str(root), stage, force=force, wait_for=[futures[u] for u in upstream if u in futures]
                )
                futures[stage] = future
                running[future] = stage
        if not running:
            continue
        done = next(as_completed(list(running)))
        stage = running.pop(done)
        try:
            result.outcomes[stage] = done.result()  # the final state, retries done
        except Exception as error:  # the task's own exception: StageFailed, or a bug
            result.outcomes[stage] = "failed"
            result.errors[stage] = str(error)
    # Report in run order, whatever order tasks finished in.
    result.outcomes = {stage: result.outcomes[stage] for stage in order}
    result.seconds = time.perf_counter() - started
    return result


def failure_state(result: PipelineResult) -> State:
    first = next(iter(result.errors))
    others = [s for s in result.errors if s != first]
    also = f"\n(also failed: {', '.join(others)})" if others else ""
    return Failed(message=f"{result.errors[first]}{also}")


# The pool is only an upper bound: execute_pipeline keeps at most orchestration.max_parallel
# stages running, read from params.yaml at run time (so served deployments honour it too).
@flow(name="pipeline", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=16))
def pipeline_flow(
    root: str = ".",
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    downstream: bool = False,
    force: bool = False,
    wait: float = 0.0,
) -> dict[str, str] | State:
    """Run dvc.yaml's stages (all, or `stages` with their upstream; `downstream`: and below).

    `overrides` (`key=value`) are written into params.yaml first, validated, and dvc.yaml is written
    from it (posttrain.spec), all under the workspace lock, so DVC's lock, MLflow's params and this run agree. One run per workspace: another run's lock is waited on
    for `wait` seconds. Returns stage -> outcome; a failed stage fails the flow with that stage's
    own error message (user errors fail it with their message, without a traceback).
    """
    logger = get_run_logger()
    project = Path(root).resolve()
    try:
        with pipeline_lock(project, wait_seconds=wait):
            changed = dag.apply_overrides(project, overrides or [])
            if changed:
                logger.info("params.yaml: set %s", ", ".join(changed))
            for line in sync_dvc_yaml(load_params(project / "params.yaml"), project, if_managed=True):
                logger.info("dvc.yaml: %s (from params.yaml)", line)
            result = execute_pipeline(project, stages, downstream=downstream, force=force, echo=logger.info)
    except PipelineError as error:
        return Failed(message=str(error))
    logger.info(result.summary())
    if result.failed:
        return failure_state(result)
    return result.outcomes
