"""The pipeline's stage graph and staleness, read through DVC from dvc.yaml (the one DAG).

Nothing here holds a copy of the graph: DVC parses dvc.yaml, links each stage's deps to the
stage whose outs contain them, and reports what changed. Prefect flows and the CLI ask this
module. DVC is imported inside the functions, so importing this module stays cheap (`posttrain
--help` and `posttrain status` answer in about a second).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import parse_params, read_yaml, set_override
from posttrain.errors import DagError
from posttrain.spec import foreach_group

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dvc.repo import Repo

Graph = dict[str, set[str]]  # stage -> the stages it directly depends on (upstream)


def dvc_command(*args: str) -> list[str]:
    """argv for DVC of this interpreter's environment (not whatever `dvc` is first on PATH).

    --wait-for-lock: parallel stages each hold DVC's repo lock briefly (before and after the
    stage's command, which runs unlocked); a second one waits instead of failing.
    """
    return [sys.executable, "-m", "dvc", "--wait-for-lock", *args]


@contextmanager
def _open_repo(root: str | Path) -> Iterator[Repo]:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
    except DvcException as error:
        raise DagError(f"{root}: not a DVC project ({error}); expected a folder with .dvc/ and dvc.yaml") from None
    try:
        yield repo
    except DvcException as error:
        if "lock" in type(error).__name__.lower() or "dvc.lock" in str(error):
            raise DagError(
                f"{Path(root) / 'dvc.lock'}: {error}; dvc.yaml is fine. Restore the lock file "
                "(git checkout dvc.lock) or delete it, and DVC reruns the stages it no longer records"
            ) from None
        raise DagError(f"{Path(root) / 'dvc.yaml'}: {error}") from None
    finally:
        repo.close()


def _name(stage: Any) -> str:
    """The stage's name as `dvc repro` takes it from the project root (DVC's own `addressing` is
    relative to the current directory): `sft`, `mix@sft`, or `sub/dvc.yaml:name` for a nested file."""
    return stage.name if stage.path_in_repo == "dvc.yaml" else f"{stage.path_in_repo}:{stage.name}"


def _pipeline_graph(repo: Repo) -> tuple[Graph, dict[str, str]]:
    """The graph by stage name, and DVC's cwd-relative addressing -> name (to read repo.status())."""
    from dvc.stage import PipelineStage

    graph: Graph = {}
    names: dict[str, str] = {}
    # repo.index.graph: nodes are stages, an edge A -> B means A depends on an out of B.
    # Only dvc.yaml stages are run; `.dvc` files (dvc add) are data sources without a command.
    for stage in repo.index.graph.nodes:
        if isinstance(stage, PipelineStage):
            graph[_name(stage)] = set()
            names[stage.addressing] = _name(stage)
    for stage, upstream in repo.index.graph.edges:
        if isinstance(stage, PipelineStage) and isinstance(upstream, PipelineStage):
            graph[_name(stage)].add(_name(upstream))
    return graph, names


def stage_graph(root: str | Path) -> Graph:
    """Every dvc.yaml stage of the project at `root`, mapped to the stages it directly depends on."""
    with _open_repo(root) as repo:
        return _pipeline_graph(repo)[0]


def topological_order(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Stages with every upstream stage before them; ties keep the graph's (dvc.yaml) order."""
    upstream = {stage: set(deps) for stage, deps in graph.items()}
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(upstream):
        ready = [s for s in upstream if s not in placed and upstream[s] <= placed]
        if not ready:
            cycle = sorted(set(upstream) - placed)
            raise DagError(f"dvc.yaml: stages {cycle} depend on each other in a cycle")
        order.extend(ready)
        placed.update(ready)
    return order


def downstream_of(graph: Mapping[str, Iterable[str]], stages: Iterable[str]) -> set[str]:
    """The given stages and every stage that (transitively) depends on one of them."""
    found = set(stages)
    changed = True
    while changed:
        changed = False
        for stage, deps in graph.items():
            if stage not in found and found & set(deps):
                found.add(stage)
                changed = True
    return found


def upstream_of(graph: Mapping[str, Iterable[str]], stages: Iterable[str]) -> set[str]:
    """The given stages and every stage they (transitively) depend on."""
    found: set[str] = set()
    todo = list(stages)
    while todo:
        stage = todo.pop()
        if stage not in found:
            found.add(stage)
            todo.extend(graph.get(stage, ()))
    return found


def select(graph: Mapping[str, Iterable[str]], targets: Iterable[str] | None, downstream: bool = False) -> list[str]:
    """Stages to consider for `targets` in run order, as `dvc repro [--downstream] TARGETS` picks them.

    No targets: every stage. A foreach stage's base name (`mix`) selects all its items (`mix@sft`).
    """
    if not targets:
        return topological_order(graph)
    chosen: set[str] = set()
    for target in targets:
        matches = [s for s in graph if s == target or foreach_group(s) == target]
        if not matches:
            raise DagError(f"stage {target!r} is not in dvc.yaml; expected one of {list(graph)}")
        chosen.update(matches)
    chosen = downstream_of(graph, chosen) if downstream else upstream_of(graph, chosen)
    return [s for s in topological_order(graph) if s in chosen]


@dataclass
class StageStatus:
    """One stage's state: stale or not, and why (DVC's own words, or the upstream stage that will rerun)."""

    stage: str
    upstream: set[str]
    reasons: list[str] = field(default_factory=list)

    @property
    def stale(self) -> bool:
        return bool(self.reasons)


def _describe(entry: str | dict[str, Any]) -> list[str]:
    """DVC's status entry, e.g. {'changed deps': {'params.yaml': {'seed': 'modified'}}} -> readable lines."""
    if isinstance(entry, str):
        return [entry]  # "always changed", ...
    lines = []
    for kind, changes in entry.items():
        if isinstance(changes, dict):
            for path, what in changes.items():
                if isinstance(what, dict):  # params: {key: status}
                    lines.extend(f"{kind}: {path}: {key} {state}" for key, state in what.items())
                else:
                    lines.append(f"{kind}: {path} {what}")
        else:
            lines.append(f"{kind}: {changes}")
    return lines


def pipeline_status(root: str | Path) -> tuple[Graph, dict[str, StageStatus]]:
    """The graph and, per stage in run order, whether `dvc repro` would run it and why.

    DVC's status lists a stage only when its own deps, params or outs changed; a stage below a
    changed one is stale too (its inputs will change), which is added here as the reason.
    """
    with _open_repo(root) as repo:
        graph, names = _pipeline_graph(repo)
        raw = {names.get(key, key): value for key, value in repo.status().items()}
    result: dict[str, StageStatus] = {}
    for stage in topological_order(graph):
        status = StageStatus(stage, graph[stage])
        for entry in raw.get(stage, []):
            status.reasons.extend(_describe(entry))
        stale_upstream = sorted(s for s in graph[stage] if result[s].stale)
        if stale_upstream:
            status.reasons.append(f"upstream stage(s) {', '.join(stale_upstream)} will rerun")
        result[stage] = status
    return graph, result


def stale_stages(root: str | Path) -> dict[str, list[str]]:
    """Stage -> reasons, for the stages `dvc repro` would run (in run order)."""
    _, statuses = pipeline_status(root)
    return {name: s.reasons for name, s in statuses.items() if s.stale}


def last_metrics(root: str | Path) -> dict[str, dict[str, Any]]:
    """The latest metrics file of every stage (artifacts/metrics/<stage>.json), for `posttrain status`."""
    folder = Path(root) / "artifacts" / "metrics"
    metrics: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            metrics[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            metrics[path.stem] = {"error": f"{path}: unreadable ({error})"}
    return metrics


def apply_overrides(
    root: str | Path, overrides: Iterable[str], check: Callable[[Any], None] | None = None
) -> list[str]:
    """Write `key=value` overrides into <root>/params.yaml, the way `dvc exp run -S` does.

    The params file stays the single source that DVC's lock, MLflow and the flow all read. The
    result is validated with posttrain.config before anything is written (a bad value leaves the
    file untouched), comments are kept (DVC's round-trip YAML), and the file is replaced atomically.
    Returns the overrides that changed a value (applying the same override twice is a no-op).
    `check(params)` may raise to refuse the new params; the file is then left untouched.
    """
    from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

    overrides = list(overrides)
    if not overrides:
        return []
    path = Path(root) / "params.yaml"
    read_yaml(path)  # same "not found" / "malformed YAML" errors as load_params
    raw = parse_yaml_for_update(path.read_text(), str(path))
    changed = []
    for assignment in overrides:
        snapshot = json.dumps(raw, sort_keys=True, default=str)
        set_override(raw, assignment)
        if json.dumps(raw, sort_keys=True, default=str) != snapshot:
            changed.append(assignment)
    params = parse_params(json.loads(json.dumps(raw, default=str)), source=f"{path} with --set {' '.join(overrides)}")
    if check is not None:
        check(params)  # the caller's checks of the new params, before anything is written
    if changed:
        fd, tmp = tempfile.mkstemp(prefix=".params.", suffix=".yaml", dir=path.parent)
        with os.fdopen(fd, "w") as handle:
            handle.write(dumps_yaml(raw))
        os.chmod(tmp, path.stat().st_mode & 0o777)  # mkstemp makes it 0600
        os.replace(tmp, path)
    return changed
