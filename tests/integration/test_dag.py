"""posttrain.pipeline.dag reads the stage graph and staleness through DVC, and writes overrides into params.yaml."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures.toy_dvc import make_toy_project, toy_env

from posttrain.errors import ParamsError
from posttrain.pipeline import dag

ROOT = Path(__file__).resolve().parents[2]


def dvc_dag_edges(root: Path) -> set[tuple[str, str]]:
    """(upstream, stage) edges as `dvc dag --dot` prints them: the reference the graph must match."""
    dot = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--dot"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r'"([^"]+)" -> "([^"]+)"', dot))


def as_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(up, stage) for stage, ups in graph.items() for up in ups}


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATH", toy_env()["PATH"])
    return make_toy_project(tmp_path / "toy")


def test_graph_of_the_real_dvc_yaml_equals_dvc_dag() -> None:
    graph = dag.stage_graph(ROOT)
    assert as_edges(graph) == dvc_dag_edges(ROOT)
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(graph) == list(declared)  # every stage, in dvc.yaml's order
    order = dag.topological_order(graph)
    assert all(order.index(up) < order.index(stage) for stage, ups in graph.items() for up in ups)


def test_toy_graph_has_two_parallel_branches(toy: Path) -> None:
    graph = dag.stage_graph(toy)
    assert graph == {"source": set(), "left": {"source"}, "right": {"source"}, "join": {"left", "right"}}
    assert as_edges(graph) == dvc_dag_edges(toy)


def test_graph_ignores_dvc_add_sources_and_names_stages_from_the_root(toy: Path, monkeypatch) -> None:
    (toy / "raw").mkdir()
    (toy / "raw" / "x.txt").write_text("x")
    subprocess.run([sys.executable, "-m", "dvc", "add", "raw"], cwd=toy, check=True, capture_output=True)
    monkeypatch.chdir(toy / "toy")  # DVC's own `addressing` would be relative to here
    assert set(dag.stage_graph(toy)) == {"source", "left", "right", "join"}


def test_select_follows_dvc_repro_semantics() -> None:
    graph = {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"b", "c"}}
    assert dag.select(graph, None) == ["a", "b", "c", "d"]
    assert dag.select(graph, ["b"]) == ["a", "b"]
    assert dag.select(graph, ["b"], downstream=True) == ["b", "d"]
    with pytest.raises(dag.DagError, match="'nope' is not in dvc.yaml"):
        dag.select(graph, ["nope"])
    with pytest.raises(dag.DagError, match="cycle"):
        dag.topological_order({"a": {"b"}, "b": {"a"}})


def test_staleness_is_dvcs_and_propagates_downstream(toy: Path) -> None:
    assert set(dag.stale_stages(toy)) == {"source", "left", "right", "join"}
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=toy, check=True)
    assert dag.stale_stages(toy) == {}
    (toy / "toy" / "right.py").write_text((toy / "toy" / "right.py").read_text() + "\n# edited\n")
    stale = dag.stale_stages(toy)
    assert list(stale) == ["right", "join"]
    assert any("toy/right.py modified" in reason for reason in stale["right"])
    assert stale["join"] == ["upstream stage(s) right will rerun"]


def test_overrides_are_validated_written_and_keep_comments(toy: Path) -> None:
    params = toy / "params.yaml"
    assert dag.apply_overrides(toy, ["seed=7", "orchestration.max_parallel=3"]) == [
        "seed=7",
        "orchestration.max_parallel=3",
    ]
    text = params.read_text()
    assert text.startswith("# Smallest params file")  # DVC's round-trip YAML keeps comments
    assert yaml.safe_load(text)["seed"] == 7
    assert dag.apply_overrides(toy, ["seed=7"]) == []  # no change, file untouched
    with pytest.raises(ParamsError, match="orchestration.max_parallel"):
        dag.apply_overrides(toy, ["orchestration.max_parallel=0"])
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        dag.apply_overrides(toy, ["seed"])
    assert params.read_text() == text  # a rejected override writes nothing
