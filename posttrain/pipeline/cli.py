"""`posttrain`: the command line of the pipeline.

Heavy libraries (prefect, mlflow, dvc, torch) are imported inside the commands that need them, so
`posttrain --help`, `validate` and `status` answer in about a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from posttrain import spec
from posttrain.config import TRAINING_STAGES, Params, load_params
from posttrain.data import userdeps
from posttrain.errors import ParamsError, PipelineError
from posttrain.layout import find_root
from posttrain.pipeline import dag, services
from posttrain.pipeline.workspace import pipeline_lock

app = typer.Typer(
    name="posttrain",
    help="Reproducible multi-stage LLM post-training: DVC decides what is stale, Prefect runs it, MLflow records it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RootOption = Annotated[
    Path | None, typer.Option("--root", help="Project folder (default: nearest folder with params.yaml and dvc.yaml).")
]
WaitOption = Annotated[
    float, typer.Option("--wait", help="Seconds to wait for another pipeline run in this workspace to finish.")
]
StagesOption = Annotated[
    list[str] | None,
    typer.Option("--stages", "-s", help="Stage(s) to run, with their upstream stages (repeat or comma-separate)."),
]


def _root(root: Path | None) -> Path:
    return (root or find_root()).resolve()


def _fail(message: str) -> None:
    # A stage's own message already starts with "error: stage X:" (posttrain.pipeline.entry).
    typer.echo(message if message.startswith("error:") else f"error: {message}", err=True)
    raise typer.Exit(1)


def _split(values: list[str] | None) -> list[str] | None:
    items = [item.strip() for value in values or [] for item in value.split(",") if item.strip()]
    return items or None


def _load(root: Path) -> Any:
    return load_params(root / "params.yaml")


def _nothing_to_run(project: Path, targets: list[str] | None, downstream: bool) -> bool:
    """True when DVC finds every selected stage up to date (the caller holds the workspace lock).

    Starting Prefect (its temporary server) costs 10-20 s; a no-change run should cost what
    `dvc status` costs.
    """
    _, statuses = dag.pipeline_status(project)
    graph = {name: status.upstream for name, status in statuses.items()}
    return not any(statuses[name].stale for name in dag.select(graph, targets, downstream))


def _run_check(project: Path, targets: list[str] | None, overrides: list[str]) -> Any:
    """Everything a run needs from the params, checked before `--set` writes anything:
    the stages asked for exist, the preflight checks pass, and overridden trainer keys are TRL's."""
    # lazy: keeps the CLI fast (the preflight checks import the data generators and model builders)
    from posttrain.pipeline import preflight

    def check(params: Any) -> None:
        if targets:
            dag.select(dag.stage_graph(project), targets)
        problems = preflight.problems(params, project, drift=False)  # the run writes dvc.yaml itself
        touched = sorted({o.split(".")[0] for o in overrides if ".trainer." in o.partition("=")[0]})
        problems += preflight.trainer_key_problems(params, [s for s in touched if s in TRAINING_STAGES])
        if problems:
            raise ParamsError("params.yaml" + (" with --set" if overrides else "") + ": " + "; ".join(problems))

    return check


@app.command()
def run(
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a param, KEY=VALUE (YAML value); repeatable. Written into params.yaml."),
    ] = None,
    stages: StagesOption = None,
    downstream: Annotated[bool, typer.Option("--downstream", help="Also run the stages below --stages.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Rerun the selected stages even if DVC finds them up to date.")
    ] = False,
    no_prefect: Annotated[
        bool, typer.Option("--no-prefect", help="Run plain `dvc repro` (no Prefect server, no retries).")
    ] = False,
    no_promote: Annotated[
        bool, typer.Option("--no-promote", help="Do not apply the promotion rules after a whole-pipeline run.")
    ] = False,
    wait: WaitOption = 0.0,
    root: RootOption = None,
) -> None:
    """Run the pipeline: every stale dvc.yaml stage as a Prefect task (independent stages in parallel).

    Overrides are validated and written into params.yaml before anything runs, so DVC's lock,
    MLflow's params and the run agree (like `dvc exp run -S`, without an experiment ref).
    A whole-pipeline run (no --stages) ends with promotion: the rules' verdict on the candidate; exit code
    EXIT_REFUSED (3) when they refuse it, EXIT_INCONCLUSIVE (4) when they cannot tell.
    """
    project = _root(root)
    targets = _split(stages)
    try:
        # Lock first, then write: a second `run --set` waits here (or is refused) before it can change
        # the params.yaml or dvc.yaml this run reads; the flow below takes the same lock again (re-entrant).
        with pipeline_lock(project, wait_seconds=wait):
            check = _run_check(project, targets, overrides or [])
            for change in dag.apply_overrides(project, overrides or [], check=check):
                typer.echo(f"params.yaml: {change}")
            params = _load(project)
            if not overrides:
                check(params)
            _sync_dvc_yaml(params, project, if_managed=True)
            _run_locked(project, targets, downstream, force, no_prefect, no_promote)
    except PipelineError as error:
        _fail(str(error))


def _run_locked(
    project: Path, targets: list[str] | None, downstream: bool, force: bool, no_prefect: bool, no_promote: bool
) -> None:
    """The body of `posttrain run`, with the workspace lock held and params.yaml/dvc.yaml written."""
    if no_prefect:
        args = ["repro", *(targets or []), *(["--downstream"] if downstream else []), *(["--force"] if force else [])]
        code = subprocess.run(dag.dvc_command(*args), cwd=project).returncode
        if code == 0:
            _promote_after_run(project, targets, no_promote)
        raise typer.Exit(code)
    if not force and _nothing_to_run(project, targets, downstream):
        typer.echo("every selected stage is up to date (dvc status): nothing to run, Prefect not started")
        _promote_after_run(project, targets, no_promote)
        return
    # lazy: the flows layer (above this library) imports prefect, seconds; only the commands that start a flow need it
    from flows.pipeline import check_prefect_api, pipeline_flow

    check_prefect_api()  # a configured server that is down fails here, before any stage
    state = pipeline_flow(root=str(project), stages=targets, downstream=downstream, force=force, return_state=True)
    if state.is_failed():
        _fail(state.message or "the pipeline flow failed")
    outcomes = state.result()
    typer.echo("  ".join(f"{stage}: {outcome}" for stage, outcome in outcomes.items()))
    _promote_after_run(project, targets, no_promote, outcomes)


EXIT_REFUSED = 3  # `posttrain run` exit code when the promotion rules refuse the candidate (README)
EXIT_INCONCLUSIVE = 4  # ... when its data cannot tell (the default does not promote then)


def _promote_after_run(project: Path, targets: list[str] | None, no_promote: bool, stages: Any = None) -> None:
    """A whole-pipeline run ends with promotion: the verdict is printed, a refusal exits 3 (inconclusive 4).

    Only a DAG with an `evaluate` stage has scores to judge (`stages`: its stage names, else read).
    """
    if targets or no_promote:
        return
    try:
        names = stages if stages is not None else dag.stage_graph(project)
    except PipelineError as error:
        _fail(str(error))
    if "evaluate" not in names:
        return
    typer.echo("promotion:")
    result = _registry_call("promotion_verdict", _load_or_fail(project), project)
    if not result.promoted:
        code = EXIT_INCONCLUSIVE if result.status == "inconclusive" else EXIT_REFUSED
        word = "could not decide on (INCONCLUSIVE)" if code == EXIT_INCONCLUSIVE else "REFUSED"
        typer.echo(f"promotion {word} the candidate: exit code {code}")
        raise typer.Exit(code)


def _scalars(metrics: dict[str, Any], limit: int = 8) -> str:
    items = [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in metrics.items()
        if isinstance(v, (int, float, str))
    ]
    return ", ".join(items[:limit]) + (" ..." if len(items) > limit else "")


def _unseen_data(project: Path) -> list[str]:
    """What DVC cannot see change (dvc.yaml behind params.yaml, unpinned hub data): "up to date" would not hold."""
    try:
        params = _load(project)
        return spec.drift(params, project) + userdeps.problems(params.data, project)
    except PipelineError:
        return []  # `posttrain validate` reports an invalid params file


@app.command()
def status(
    root: RootOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print stale stages and metrics as JSON.")] = False,
) -> None:
    """Which stages are stale and why (DVC's view), and the last metrics of each stage."""
    project = _root(root)
    try:
        _, statuses = dag.pipeline_status(project)
    except PipelineError as error:
        _fail(str(error))
    metrics = dag.last_metrics(project)
    unseen = _unseen_data(project)
    if as_json:
        stale = {name: s.reasons for name, s in statuses.items() if s.stale}
        typer.echo(json.dumps({"stale": stale, "metrics": metrics, "unseen_data": unseen}, indent=2, default=str))
        return
    for name, state in statuses.items():
        typer.echo(f"{name:<16} {'stale' if state.stale else 'up to date'}")
        for reason in state.reasons:
            typer.echo(f"    {reason}")
    for line in unseen:
        typer.echo(f"warning: {line}")
    if metrics:
        typer.echo("\nlast metrics (artifacts/metrics/):")
        for name, values in metrics.items():
            typer.echo(f"  {name:<14} {_scalars(values)}")


@app.command()
def validate(
    params: Annotated[Path | None, typer.Argument(help="Params file (default: params.yaml of the project).")] = None,
    root: RootOption = None,
) -> None:
    """Load and check a params file; print OK or every bad key with its value, and exit 1."""
    # lazy: keeps the CLI fast (the preflight checks import the data generators and model builders)
    from posttrain.pipeline import preflight

    project = _root(root)
    path = (params or project / "params.yaml").resolve()
    workspace = path == (project / "params.yaml").resolve()
    try:
        # A recipe file that is not yet the workspace's params.yaml has no dvc.yaml of its own to drift from.
        problems = preflight.problems(load_params(path), project, drift=workspace)
    except PipelineError as error:
        _fail(str(error))
    if problems:
        _fail(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  {line}" for line in problems))
    typer.echo(f"OK: {path}")
    if not workspace:
        typer.echo(
            f"next: cp {params} params.yaml && ./run.sh pipeline --no-prefect  (the run writes dvc.yaml from it)"
        )


@app.command("sync-deps")
def sync_deps(root: RootOption = None, wait: WaitOption = 0.0) -> None:
    """Write dvc.yaml's pipeline stages from params.yaml (the recipe's chain, data files and params keys)."""
    project = _root(root)
    try:
        with pipeline_lock(project, wait_seconds=wait):
            if not _sync_dvc_yaml(_load(project), project):
                typer.echo("dvc.yaml: every pipeline stage already matches params.yaml")
    except PipelineError as error:
        _fail(str(error))


def _sync_dvc_yaml(params: Params, project: Path, if_managed: bool = False) -> list[str]:
    """dvc.yaml from the recipe (posttrain.spec), each change printed; the caller holds the workspace lock."""
    changes = spec.sync_dvc_yaml(params, project, if_managed=if_managed)
    for line in changes:
        typer.echo(f"dvc.yaml: {line} (from params.yaml)")
    return changes


def _registry_call(name: str, *args: Any, **kwargs: Any) -> Any:
    try:
        # lazy: keeps `posttrain --help` fast; only the registry commands need it
        from posttrain.tracking import registry
    except ImportError as error:
        _fail(f"posttrain.tracking.registry is not available ({error})")
    try:
        return getattr(registry, name)(*args, **kwargs)
    except PipelineError as error:
        _fail(str(error))


@app.command()
def promote(
    version: Annotated[
        int | None, typer.Option("--version", help="Version of the recipe's model to promote (default: the candidate).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the rules refuse (needs --reason).")] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="Why the rules are overridden (recorded).")] = None,
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for another promotion to finish.")] = 60.0,
    root: RootOption = None,
) -> None:
    """Apply the promotion rules to the candidate (or --version); champion if they pass, else exit 1 (4: inconclusive)."""
    if force and not reason:
        _fail("--force needs --reason TEXT (it is recorded with the promotion)")
    project = _root(root)
    params = _load_or_fail(project)
    if not params.tracking.enabled:
        _fail(
            f"{project / 'params.yaml'}: tracking.enabled is false, so the run registered no models and there is no "
            "registry to promote in; the verdict of the rules on this workspace is printed at the end of "
            "`posttrain run`. Set tracking.enabled: true and rerun to register and promote"
        )
    result = _registry_call(
        "promote", params, project, version=None if version is None else str(version), force=force, reason=reason,
        wait_seconds=wait,
    )  # fmt: skip
    if not result.promoted:
        raise typer.Exit(EXIT_INCONCLUSIVE if result.status == "inconclusive" else 1)


@app.command()
def rollback(
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for a promotion in progress.")] = 60.0,
    root: RootOption = None,
) -> None:
    """Make the previous champion of the recipe's registered model the champion again."""
    project = _root(root)
    _registry_call("rollback", _load_or_fail(project), project, wait_seconds=wait)


@app.command()
def registry(
    migrate: Annotated[
        bool, typer.Option("--migrate", help="Copy an older store's per-stage models into the recipe's model.")
    ] = False,
    root: RootOption = None,
) -> None:
    """Show the recipe's registered model: versions (by stage), aliases (champion, candidate), status and scores."""
    project = _root(root)
    if migrate:
        _registry_call("migrate", _load_or_fail(project), project)
    _registry_call("show", _load_or_fail(project), project)


def _load_or_fail(project: Path) -> Any:
    try:
        return _load(project)
    except PipelineError as error:
        _fail(str(error))


@app.command()
def deploy(
    cron: Annotated[
        str | None, typer.Option("--cron", help="Schedule (default: orchestration.continual.cron in params.yaml).")
    ] = None,
    pool: Annotated[str, typer.Option("--pool", help="Process work pool (created if missing).")] = "posttrain-process",
    name: Annotated[str, typer.Option("--name", help="Deployment name.")] = "continual",
    serve: Annotated[
        bool, typer.Option("--serve", help="Serve the schedule from this process (blocks) instead of a work pool.")
    ] = False,
    root: RootOption = None,
) -> None:
    """Create the scheduled deployment of the continual flow on the Prefect server in PREFECT_API_URL.

    Start a server first (`prefect server start`, then `prefect config set
    PREFECT_API_URL=http://127.0.0.1:4200/api`); after deploying, `prefect worker start --pool
    posttrain-process` runs the scheduled runs. GPU clusters: see flows/continual.py.
    """
    project = _root(root)
    params = _load_or_fail(project)
    schedule = cron or params.orchestration.continual.cron
    try:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=schedule)
        except ValidationError:
            raise ParamsError(f"cron {schedule!r} is not a valid cron expression; expected e.g. '0 2 * * *'") from None
        # lazy: the flows layer (above this library) imports prefect, seconds; only the commands that start a flow need it
        from flows.continual import deploy_continual

        deployment = deploy_continual(project, schedule, pool=pool, name=name, serve=serve)
    except PipelineError as error:
        _fail(str(error))
    typer.echo(f"deployment continual/{name} ({deployment}): cron {schedule!r} on work pool {pool!r}")
    typer.echo(f"run its scheduled work with: prefect worker start --pool {pool}")


@app.command()
def continual(
    stages: StagesOption = None,
    no_promote: Annotated[bool, typer.Option("--no-promote", help="Do not apply the promotion rules.")] = False,
    wait: WaitOption = 600.0,
    root: RootOption = None,
) -> None:
    """Run the continual flow once: ingest new files, rerun the pipeline, apply the promotion rules."""
    project = _root(root)
    _load_or_fail(project)
    # lazy: the flows layer (above this library) imports prefect, seconds; only the commands that start a flow need it
    from flows.continual import DEFAULT_PROMOTE, continual_flow
    from flows.pipeline import check_prefect_api

    try:
        check_prefect_api()
    except PipelineError as error:
        _fail(str(error))

    state = continual_flow(
        root=str(project),
        stages=_split(stages),
        promote=None if no_promote else DEFAULT_PROMOTE,
        wait=wait,
        return_state=True,
    )
    if state.is_failed():
        _fail(state.message or "the continual flow failed")
    typer.echo(json.dumps(state.result(), indent=2, default=str))


@app.command()
def seeds(
    n: Annotated[int, typer.Argument(help="Number of seeds: params.yaml's seed, seed+1, ..., seed+N-1.", min=1)],
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Experiments run in parallel by DVC's queue.", min=1)] = 1,
    root: RootOption = None,
) -> None:
    """Run the recipe under N seeds as DVC experiments; write artifacts/metrics/seeds.json and a plot."""
    # lazy: keeps the CLI fast (the sweep imports DVC)
    from posttrain.pipeline.sweep import run_sweep
    from posttrain.scoring.seeds import PLOT_PATH, SEEDS_PATH

    project = _root(root)
    base = _load_or_fail(project).seed
    try:
        summary, failed = run_sweep(project, [base + i for i in range(n)], jobs=jobs)
    except PipelineError as error:
        _fail(str(error))
    typer.echo(f"{SEEDS_PATH} and {PLOT_PATH}: seeds {summary['seeds']}")
    for line in summary["targets_failed"]:
        typer.echo(f"  target missed: {line}")
    if failed:
        _fail(f"the experiments of seeds {failed} failed; see `dvc queue logs <name>` (dvc exp show lists them)")


@app.command()
def clean(
    all_: Annotated[bool, typer.Option("--all", help="Delete every checkpoint, of every key.")] = False,
    keep: Annotated[
        int | None,
        typer.Option("--keep", help="Key folders kept per stage, newest first (default: as at stage start, 2).", min=1),
    ] = None,
    root: RootOption = None,
) -> None:
    """Delete old checkpoints: all but the newest --keep key folders per stage (or --all)."""
    # lazy: keeps the CLI fast (training.checkpoints imports transformers)
    from posttrain.training import checkpoints

    removed = checkpoints.clean(_root(root) / "checkpoints", keep=keep or checkpoints.KEEP_KEYS, everything=all_)
    typer.echo("\n".join(f"removed {path}" for path in removed) or "nothing to remove")


services_app = typer.Typer(
    help="Team services on this machine (docs/team-mode.md): PostgreSQL, an S3 store (moto), the MLflow and "
    "Prefect servers and a Prefect worker, on 127.0.0.1.",
    no_args_is_help=True,
)
app.add_typer(services_app, name="services")
StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir", help="Folder of the service set (default: $POSTTRAIN_SERVICES_DIR, else <root>/.services)."
    ),
]


@services_app.command("up")
def services_up(
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Run the MLflow server without its basic-auth app.")
    ] = False,
    root: RootOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Start what is not running (idempotent), make the S3 store this workspace's DVC remote, write team.env."""
    project = _root(root)
    try:
        services.up(project, services.state_dir(project, state_dir), auth=not no_auth, echo=typer.echo)
    except PipelineError as error:
        _fail(str(error))


@services_app.command("status")
def services_status(
    root: RootOption = None,
    state_dir: StateDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Which services run, their URLs and process ids (no secrets); exit 1 when any is down."""
    try:
        folder = services.state_dir(_root(root), state_dir)
        found = services.status(folder)
    except PipelineError as error:
        _fail(str(error))
    if as_json:
        typer.echo(json.dumps(found, indent=2))
    else:
        for line in services.describe(services.load_state(folder)):
            typer.echo(line)
    if not all(info["running"] for info in found.values()):
        raise typer.Exit(1)


@services_app.command("down")
def services_down(
    purge: Annotated[
        bool, typer.Option("--purge", help="Also delete the state folder: databases, S3 contents, secrets.")
    ] = False,
    root: RootOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Stop the services (their data stays for the next `up`, except moto's S3 objects, kept in memory)."""
    try:
        folder = services.state_dir(_root(root), state_dir)
        stopped = services.down(folder, purge=purge)
    except PipelineError as error:
        _fail(str(error))
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}" + (f"; deleted {folder}" if purge else ""))


def main() -> None:  # pragma: no cover - `python -m posttrain.pipeline.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
