"""The library's shape, checked from the source: no import cycles, no unexplained imports inside functions.

Every module of `posttrain/`, `stages/` and `flows/` is parsed with `ast` (nothing is imported).
An import inside a function hides a dependency from the reader and, between project modules, is the
usual way a cycle gets papered over; each one must say why it is there with a `# lazy: <reason>`
comment, on its line or on the comment line(s) right above its block of imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("posttrain", "stages", "flows")
MARKER = "# lazy:"

# The layer rule of docs/design.md: a module imports only modules of its own layer or below.
# Longest matching prefix wins.
LAYERS = {
    "posttrain": 0,  # the package's __init__ (telemetry switches)
    "posttrain.errors": 0,
    "posttrain.data.verifiers": 0,
    "posttrain.scoring.rewards": 0,
    "posttrain.config": 1,
    "posttrain.layout": 1,
    "posttrain.io": 1,
    "posttrain.spec": 1,
    "posttrain.lineage": 2,
    "posttrain.stage": 2,
    "posttrain.runtime": 2,
    "posttrain.data": 3,
    "posttrain.models": 4,
    "posttrain.scoring": 4,
    "posttrain.training": 5,
    "posttrain.tracking": 5,
    "posttrain.pipeline": 6,
    "stages": 7,
    "flows": 8,
}
# Heavy libraries (a second or more to import; docs/design.md, "Heavy imports") are imported inside the
# function that needs them, with no comment: the one rule that keeps `posttrain --help`, `validate` and
# every stage's start fast. Any other import inside a function states why with a `# lazy: <reason>` comment.
HEAVY = {
    "accelerate", "bitsandbytes", "boto3", "datasets", "deepspeed", "dvc", "gguf", "huggingface_hub", "kernels",
    "liger_kernel", "lm_eval", "math_verify", "matplotlib", "mlflow", "moto", "numpy", "pandas", "peft", "prefect",
    "pyarrow", "ruamel", "safetensors", "scmrepo", "sqlalchemy", "tokenizers", "torch", "transformers", "trl", "vllm",
}  # fmt: skip
# Upward imports the design allows, each inside a function with its reason: the CLI starts flows.
UPWARD_ALLOWED = {("posttrain.pipeline.cli", "flows.pipeline"), ("posttrain.pipeline.cli", "flows.continual")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports_of(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(import node, inside a function) for every import that runs, TYPE_CHECKING-only blocks excluded."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                for sub in child.orelse:  # the `else:` branch of `if TYPE_CHECKING` does run
                    walk(sub, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return found


def targets(node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    """The project modules an import statement loads (`from pkg import mod` counts as importing pkg.mod)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    return {name for name in names if name in known}


def import_graph(known: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node, _ in imports_of(tree):
            edges |= targets(node, known)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def heavy(node: ast.Import | ast.ImportFrom) -> bool:
    """Every module the statement imports is a heavy library (or one of its submodules)."""
    names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return bool(names) and all(name.split(".")[0] in HEAVY for name in names) and getattr(node, "level", 0) == 0


def unexplained_lazy_imports(path: Path) -> list[str]:
    """Function-level imports of anything but a heavy library without a `# lazy:` reason on their line or above
    their block."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines), filename=str(path))
    bad = []
    for node, in_function in imports_of(tree):
        if not in_function or heavy(node):
            continue
        explained = any(MARKER in lines[i] for i in range(node.lineno - 1, node.end_lineno))
        i = node.lineno - 2  # walk up over the imports and comments right above (one block shares a reason)
        while not explained and i >= 0:
            text = lines[i].strip()
            if text.startswith("#"):
                explained = MARKER in text
            elif not text.startswith(("import ", "from ")) and not (text.endswith((",", "(")) or text == ")"):
                break
            i -= 1
        if not explained:
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return bad


def test_no_import_cycles_among_project_modules() -> None:
    graph = import_graph(project_modules())
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def layer_of(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module}: no layer in LAYERS; add it (and to docs/design.md)")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets_ in sorted(graph.items())
        for target in sorted(targets_)
        if layer_of(target) > layer_of(source) and (source, target) not in UPWARD_ALLOWED
    ]


def test_imports_follow_the_layer_rule() -> None:
    bad = upward_imports(import_graph(project_modules()))
    assert not bad, "imports against the layer rule of docs/design.md:\n" + "\n".join(bad)
    assert upward_imports({"posttrain.config": {"posttrain.training.job"}}) == [
        "posttrain.config (layer 1) imports posttrain.training.job (layer 5)"
    ]


def test_every_import_inside_a_function_states_why() -> None:
    bad = [line for path in project_modules().values() for line in unexplained_lazy_imports(path)]
    assert not bad, (
        "imports inside functions (not of a HEAVY library) without a `# lazy: <reason>` comment:\n" + "\n".join(bad)
    )


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The cycle finder sees a cycle made only of function-level imports, and an unmarked lazy import that is
    not a heavy library."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = "def f():\n    import json\n\n\ndef g():\n    import torch\n    import trl\n\n\ndef h():\n    # lazy: why\n    import csv\n"
    module = tmp_path / "m.py"
    module.write_text(source)
    tree = ast.parse(source)
    assert [in_function for _, in_function in imports_of(tree)] == [True, True, True, True]
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert unexplained_lazy_imports(module) == ["m.py:2: import json"]
    finally:
        ROOT = saved


@pytest.mark.parametrize(
    "package", ["posttrain.models", "posttrain.training", "posttrain.scoring", "posttrain.tracking"]
)
def test_package_init_imports_nothing(package: str) -> None:
    """Importing a package must not import its submodules: `posttrain.config` imports `posttrain.scoring.rewards`
    and `posttrain.data.verifiers`, and the CLI imports the pipeline package, without paying for torch."""
    path = project_modules()[package]
    assert not imports_of(ast.parse(path.read_text())), f"{path} imports something"
