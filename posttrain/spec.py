"""One typed spec per pipeline stage, built once from the recipe: the only place that knows a stage's identity.

A `StageSpec` says what a stage is and what it depends on: its name (`sft`, or `sft@arith` for a
variant), the DVC stage that runs it (`sft`, `sft_variants@arith`), the code and data it reads, the
params keys DVC reruns it for, the model stages it reads (its parents) and what it writes. Everything
that needs a stage's identity reads it from here: the checkpoint key, the params MLflow records and
their hash, the params-unchanged check of a stage process, `posttrain sync-deps`, the deps test, the
registry's tags and the Prefect flow. Nothing else parses stage names or reads dvc.yaml by hand
(`posttrain.pipeline.dag` asks DVC itself for the graph).

The chain belongs to the recipe: each training stage's `parent` (params `<stage>.parent`; default:
the previous stage of pretrain > cpt > sft > dpo > grpo), and a stage runs only when something the
recipe evaluates, merges or promotes needs it (`Params.chain`). `recipe_specs(params, root)` gives
the specs of exactly those stages, and `render_dvc_yaml` writes them as dvc.yaml: the file is
generated from params.yaml by `posttrain sync-deps` (and `posttrain run`); stages a user adds to
dvc.yaml by hand that are not pipeline stages are kept as they are.

This module is a leaf (yaml and the standard library only; `Params` is read by attribute): the config
schema imports its stage names from here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from posttrain.errors import ParamsError
from posttrain.io import write_text_atomic

if TYPE_CHECKING:
    from posttrain.config import Params

# --------------------------------------------------------------------------- names

STAGE_NAMES = ("prepare", "mix", "pretrain", "cpt", "sft", "dpo", "grpo", "merge", "evaluate")
MODEL_STAGES = ("pretrain", "cpt", "sft", "dpo", "grpo", "merge")
TRAINING_STAGES = ("pretrain", "cpt", "sft", "dpo", "grpo")
# The default chain: each training stage's parent unless the recipe sets `<stage>.parent`.
DEFAULT_PARENTS: dict[str, str | None] = {
    "pretrain": None,
    "cpt": "pretrain",
    "sft": "cpt",
    "dpo": "sft",
    "grpo": "dpo",
}
# Training stages that may declare variants (`variants.<stage>.<name>`): dvc.yaml runs each as its own
# stage `<stage>_variants@<name>` (DVC's `foreach`); its model stage name is `<stage>@<name>`.
VARIANT_STAGES = ("sft",)
VARIANT_NAME = re.compile(r"[a-z0-9_]+")
VARIANT_SEPARATOR = "@"


def split_name(name: str) -> tuple[str, str | None]:
    """'sft@arith' -> ('sft', 'arith'); 'sft' -> ('sft', None). The stage module is the first part."""
    kind, separator, variant = name.partition(VARIANT_SEPARATOR)
    return kind, (variant if separator else None)


def variant_name(kind: str, variant: str) -> str:
    return f"{kind}{VARIANT_SEPARATOR}{variant}"


def is_variant(name: str) -> bool:
    return split_name(name)[1] is not None


def mlflow_key(key: str) -> str:
    """A params key as MLflow takes it: MLflow refuses '@', so `mixtures.sft@arith` -> `mixtures.sft:arith`."""
    return key.replace(VARIANT_SEPARATOR, ":")


def foreach_group(dvc_name: str) -> str:
    """A DVC stage's group: 'sft_variants@arith' -> 'sft_variants' (DVC's foreach item); others unchanged."""
    return split_name(dvc_name)[0]


def variants_stage(kind: str) -> str:
    """The dvc.yaml `foreach` stage running the variants of `kind`: 'sft' -> 'sft_variants'."""
    return f"{kind}_variants"


def dvc_stage_name(name: str) -> str:
    """The DVC stage that runs model stage `name`: 'sft@arith' -> 'sft_variants@arith'."""
    kind, variant = split_name(name)
    return variant_name(variants_stage(kind), variant) if variant else kind


def stage_of_dvc_name(dvc_name: str) -> str:
    """The inverse of dvc_stage_name: 'sft_variants@arith' -> 'sft@arith'."""
    group, item = split_name(dvc_name)
    for kind in VARIANT_STAGES:
        if item is not None and group == variants_stage(kind):
            return variant_name(kind, item)
    return dvc_name


# --------------------------------------------------------------------------- paths

ARTIFACTS = "artifacts"
PREPARED = "artifacts/data/prepared"
MIXTURES = "artifacts/data/mixtures"
VARIANTS = "artifacts/variants"
METRICS = "artifacts/metrics"
PLOTS = "artifacts/plots"


def model_path(name: str) -> str:
    """A model stage's output folder, relative to the project root (variants share one parent folder,
    so that a reader can see them together)."""
    return f"{VARIANTS}/{name}" if is_variant(name) else f"{ARTIFACTS}/models/{name}"


def metrics_path(name: str) -> str:
    return f"{METRICS}/{'eval' if name == 'evaluate' else name}.json"


# --------------------------------------------------------------------------- code each stage runs

# The folder holding the code that runs (posttrain/, stages/): the project root in a DVC project.
CODE_ROOT = Path(__file__).resolve().parents[1]

# The project modules a stage's process imports, as dvc.yaml deps: package folders, so a new module
# is covered the day it is added (tests/integration/test_dvc_deps.py checks the list is complete).
# posttrain/pipeline is listed by file: a stage process runs entry.py and launch.py, never the CLI.
_CORE = (
    "posttrain/__init__.py",
    "posttrain/config.py",
    "posttrain/errors.py",
    "posttrain/io.py",
    "posttrain/layout.py",
    "posttrain/lineage.py",
    "posttrain/runtime.py",
    "posttrain/spec.py",
    "posttrain/stage.py",
    "posttrain/data",
)
_ENTRY = ("posttrain/pipeline/__init__.py", "posttrain/pipeline/entry.py", "posttrain/pipeline/launch.py")
# Which library packages beyond the core each stage module loads.
_PACKAGES = {
    "prepare": ("posttrain/scoring", "posttrain/tracking"),
    "mix": ("posttrain/scoring", "posttrain/tracking"),
    "evaluate": ("posttrain/models", "posttrain/scoring", "posttrain/tracking"),
}
_TRAINING_PACKAGES = ("posttrain/models", "posttrain/scoring", "posttrain/tracking", "posttrain/training")


def code_deps(kind: str) -> tuple[str, ...]:
    """The code deps of stage module `kind` (sorted like the hand-written lists they replace)."""
    packages = _PACKAGES.get(kind, _TRAINING_PACKAGES)
    return ("stages/__init__.py", f"stages/{kind}.py", *sorted((*_CORE, *_ENTRY, *packages)))


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage, as the recipe defines it."""

    name: str  # the model/MLflow/artifacts name: 'sft', 'sft@arith', 'evaluate'
    kind: str  # the stage module under stages/: 'sft'
    variant: str | None  # 'arith' for sft@arith
    code_deps: tuple[str, ...]
    data_deps: tuple[str, ...]  # prepared data, mixtures and parent model folders, as dvc.yaml lists them
    params_keys: tuple[str, ...]  # what DVC reruns the stage for (and MLflow records)
    parents: tuple[str, ...] = ()  # model stages whose outputs it reads
    outs: tuple[str, ...] = ()
    plots: tuple[Any, ...] = ()  # dvc.yaml `plots:` entries (evaluate)
    command: str = ""

    @property
    def dvc_name(self) -> str:
        return dvc_stage_name(self.name)

    @property
    def metrics(self) -> str:
        return metrics_path(self.name)

    @property
    def model_dir(self) -> str | None:
        return model_path(self.name) if self.kind in MODEL_STAGES else None

    @property
    def deps(self) -> tuple[str, ...]:
        return (*self.code_deps, *self.data_deps)

    @property
    def trained(self) -> bool:
        return self.kind in TRAINING_STAGES


def _user_files(params: Params, root: Path) -> list[str]:
    """The user data files `prepare` reads (file domains, hub ids that are local folders), as dvc.yaml deps."""
    files = []
    for domain in params.data.domains.values():
        if domain.kind == "file":
            files.append(dep_path(domain.path, root))
        elif domain.kind == "hub":
            local = Path(domain.name) if Path(domain.name).is_absolute() else root / domain.name
            if local.exists():
                files.append(dep_path(domain.name, root))
    return sorted(set(files))


def dep_path(path: str, root: Path) -> str:
    """A path as dvc.yaml names it: relative to the project root when inside it, else absolute."""
    given = Path(path)
    full = given if given.is_absolute() else root / given
    try:
        return full.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(full.resolve())


def _training_spec(params: Params, name: str, root: Path) -> StageSpec:
    kind, variant = split_name(name)
    parent = params.parent_of(name)
    mixture = f"mixtures.{name}"
    if kind == "pretrain":
        # Only the tokenizer's domains: a domain added later (e.g. for CPT) must not rerun the base model.
        data = tuple(f"{PREPARED}/{d}" for d in params.pretrain_domains())
        tokenizer = params.model.tokenizer.path if params.model.base == "scratch" else None
        data += (
            (dep_path(tokenizer, root),)
            if tokenizer and (Path(tokenizer) if Path(tokenizer).is_absolute() else root / tokenizer).exists()
            else ()
        )
        keys: tuple[str, ...] = ("seed", "compute", "model", mixture, kind)
    else:
        data = (PREPARED,)
        # `model`: how every stage loads its input (attention kernel, remote code), not only pretrain's base.
        keys = ("seed", "compute", "model", "data.domains", mixture, kind)
    if variant:
        keys = (*keys, f"variants.{kind}.{variant}")
    parents = (parent,) if parent else ()
    return StageSpec(
        name=name,
        kind=kind,
        variant=variant,
        code_deps=code_deps(kind),
        data_deps=(*data, f"{MIXTURES}/{name}", *(model_path(p) for p in parents)),
        params_keys=keys,
        parents=parents,
        outs=(model_path(name),),
        command=f"python -m stages.{kind}" + (f" --variant {variant}" if variant else ""),
    )


EVAL_PLOTS: tuple[Any, ...] = (
    {f"{PLOTS}/eval_scores.png": {"cache": False}},
    {f"{PLOTS}/forgetting.png": {"cache": False}},
    {f"{PLOTS}/stability_gap.png": {"cache": False}},
    {
        f"{PLOTS}/eval_scores.csv": {
            "x": "exact_match",
            "y": "model_domain",
            "template": "bar_horizontal",
            "cache": False,
        }
    },
    {f"{PLOTS}/forgetting.json": {"x": "value", "y": "model_domain", "template": "bar_horizontal", "cache": False}},
    {f"{PLOTS}/stability_gap.csv": {"x": "pipeline_step", "y": "exact_match", "template": "scatter", "cache": False}},
)


def recipe_specs(params: Params, root: Path) -> dict[str, StageSpec]:
    """The specs of every stage the recipe runs, in run order, by name (`sft@arith` for a variant)."""
    specs: dict[str, StageSpec] = {
        "prepare": StageSpec(
            "prepare", "prepare", None, code_deps("prepare"), tuple(_user_files(params, root)), ("data",),
            outs=(PREPARED,), command="python -m stages.prepare",
        ),
        "mix": StageSpec(
            "mix", "mix", None, code_deps("mix"), (PREPARED,), ("mixtures",),
            outs=(MIXTURES,), command="python -m stages.mix",
        ),
    }  # fmt: skip
    chain = params.chain()
    for name in chain:
        if split_name(name)[0] in TRAINING_STAGES:
            specs[name] = _training_spec(params, name, root)
    if "merge" in chain:
        merged = params.merge_inputs()
        specs["merge"] = StageSpec(
            "merge", "merge", None, code_deps("merge"), (PREPARED, *(model_path(s) for s in merged)), ("merge",),
            parents=tuple(merged), outs=(model_path("merge"),), command="python -m stages.merge",
        )  # fmt: skip
    evaluated = tuple(params.evaluate.models)
    specs["evaluate"] = StageSpec(
        "evaluate", "evaluate", None, code_deps("evaluate"), (PREPARED, *(model_path(s) for s in evaluated)),
        ("seed", "compute", "data.domains", "evaluate"), parents=evaluated, plots=EVAL_PLOTS,
        command="python -m stages.evaluate",
    )  # fmt: skip
    return specs


def stage_spec(params: Params, root: Path, name: str) -> StageSpec:
    """The spec of one stage of the recipe; ParamsError when the recipe does not run it."""
    specs = recipe_specs(params, root)
    if name not in specs:
        raise ParamsError(
            f"stage {name!r} is not in this recipe's chain ({', '.join(specs)}); a stage runs when evaluate.models, "
            "merge, promotion or another stage's `parent` needs it"
        )
    return specs[name]


# --------------------------------------------------------------------------- params values


_ABSENT = object()


def lookup(raw: Any, dotted: str) -> Any:
    """The value at `a.b.c` of a raw mapping (`_ABSENT` when a part is missing). Keys may hold '@'."""
    node = raw
    for part in dotted.split("."):
        node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT:
            return _ABSENT
    return node


def declared_values(spec: StageSpec, raw: dict[str, Any]) -> dict[str, Any]:
    """The values of the stage's params keys in a raw params mapping: what DVC writes into dvc.lock."""
    return {key: lookup(raw, key) for key in spec.params_keys}


def is_absent(value: Any) -> bool:
    return value is _ABSENT


def effective_values(spec: StageSpec, params: Params) -> dict[str, Any]:
    """The settings the stage ran with, by params key: for a variant its own merged section and seed
    (what MLflow records and hashes: `sft@arith` ran its 120 steps, not sft's 1200)."""
    dumped = params.model_dump(mode="json")
    values: dict[str, Any] = {}
    for key in spec.params_keys:
        if spec.variant and key == f"variants.{spec.kind}.{spec.variant}":
            continue  # folded into the section below
        if spec.variant and key == spec.kind:
            values[key] = params.stage_section(spec.name).model_dump(mode="json")
        elif spec.variant and key == "seed":
            values[key] = params.stage_seed(spec.name)
        else:
            value = lookup(dumped, key)
            if not is_absent(value):
                values[key] = value
    return values


# --------------------------------------------------------------------------- dvc.yaml

DVC_FILE = "dvc.yaml"
HEADER = """\
# Generated from params.yaml by `posttrain sync-deps` (also run by `posttrain run`): the pipeline's
# stages as the recipe defines them (posttrain/spec.py). Edit params.yaml, not these stages: each
# stage's parent is `<stage>.parent`, and a stage runs when evaluate.models, merge or promotion needs
# it. Stages you add here that are not pipeline stages are kept as they are.
# Checkpoints live in checkpoints/ (not an output: DVC deletes outputs before rerunning a stage, and a
# resumed stage needs them).
"""


def _entry(spec: StageSpec, template: bool = False) -> dict[str, Any]:
    def sub(text: str) -> str:
        return text.replace(f"{VARIANT_SEPARATOR}{spec.variant}", f"{VARIANT_SEPARATOR}${{key}}") if template else text

    entry: dict[str, Any] = {
        "cmd": spec.command.replace(f"--variant {spec.variant}", "--variant ${key}") if template else spec.command
    }
    entry["deps"] = [sub(d) for d in spec.deps]
    entry["params"] = [
        (f"variants.{spec.kind}.${{key}}" if template and k == f"variants.{spec.kind}.{spec.variant}" else sub(k))
        for k in spec.params_keys
    ]
    if spec.outs:
        entry["outs"] = [sub(o) for o in spec.outs]
    entry["metrics"] = [{sub(spec.metrics): {"cache": False}}]
    if spec.plots:
        entry["plots"] = list(spec.plots)
    return entry


def render_stages(specs: dict[str, StageSpec]) -> dict[str, Any]:
    """dvc.yaml's `stages:` for the specs: one entry per stage, one `foreach` stage per variant kind."""
    stages: dict[str, Any] = {}
    for spec in specs.values():
        if spec.variant is None:
            stages[spec.name] = _entry(spec)
        elif variants_stage(spec.kind) not in stages:
            stages[variants_stage(spec.kind)] = {"foreach": f"${{variants.{spec.kind}}}", "do": _entry(spec, True)}
    return stages


def read_dvc_yaml(root: Path) -> dict[str, Any] | None:
    """<root>/dvc.yaml as a mapping (None when there is none)."""
    path = root / DVC_FILE
    if not path.is_file():
        return None
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: malformed YAML ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("stages") or {}, dict):
        raise ParamsError(f"{path}: expected a mapping with `stages:`")
    return document


def pipeline_stage_names(specs: dict[str, StageSpec]) -> set[str]:
    return {spec.name if spec.variant is None else variants_stage(spec.kind) for spec in specs.values()}


def generated(root: Path) -> bool:
    """dvc.yaml was written by `posttrain sync-deps` (its first line says so): posttrain keeps it in step with
    params.yaml. A hand-written one (a DAG of the user's own) is run as it is."""
    path = root / DVC_FILE
    if not path.is_file():
        return False
    with path.open() as handle:
        return handle.readline() == HEADER.splitlines(keepends=True)[0]


def _is_pipeline_stage(name: str) -> bool:
    return name in STAGE_NAMES or name in {variants_stage(k) for k in VARIANT_STAGES}


def render_dvc_yaml(specs: dict[str, StageSpec], existing: dict[str, Any] | None = None) -> str:
    """The text of dvc.yaml for the specs; a user's own (non-pipeline) stages of `existing` are kept."""
    stages = render_stages(specs)
    for name, entry in ((existing or {}).get("stages") or {}).items():
        if not _is_pipeline_stage(name):
            stages[name] = entry
    document = {key: value for key, value in (existing or {}).items() if key != "stages"}
    document["stages"] = stages
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=120)


def sync_dvc_yaml(params: Params, root: Path, if_managed: bool = False) -> list[str]:
    """Write dvc.yaml from the recipe; returns one line per pipeline stage added, removed or changed.

    `if_managed`: leave a hand-written dvc.yaml alone (not `generated`: a DAG of the user's own, run as it
    is); `posttrain run` and the flows sync this way, `posttrain sync-deps` always writes.
    The caller holds the workspace lock (posttrain.pipeline.workspace): dvc.yaml is shared state.
    """
    existing = read_dvc_yaml(root)
    if if_managed and existing is not None and not generated(root):
        return []
    text = render_dvc_yaml(recipe_specs(params, root), existing)
    changes = _changes((existing or {}).get("stages") or {}, yaml.safe_load(text)["stages"])
    path = root / DVC_FILE
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    return changes


def _changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """One line per pipeline stage that `after` adds, removes or changes, saying what differs."""
    lines = []
    for name in after:
        if name not in before:
            lines.append(f"stage {name} added")
        elif before[name] != after[name]:
            lines.append(f"stage {name}: {_difference(before[name], after[name])}")
    lines += [f"stage {name} removed" for name in before if name not in after and _is_pipeline_stage(name)]
    return lines


def _difference(before: Any, after: Any) -> str:
    """What changes in one stage's entry: deps and params added or dropped, other fields rewritten."""
    if isinstance(before, dict) and isinstance(after, dict) and "do" in after and "do" in before:
        before, after = before["do"], after["do"]
    if not isinstance(before, dict) or not isinstance(after, dict):
        return "rewritten"
    parts = []
    for key in ("deps", "params"):
        had, has = _listed(before.get(key) or []), _listed(after.get(key) or [])
        if has - had:
            parts.append(f"{key} gain {', '.join(sorted(has - had))}")
        if had - has:
            parts.append(f"{key} lose {', '.join(sorted(had - has))}")
    others = sorted(
        k for k in set(before) | set(after) if k not in ("deps", "params") and before.get(k) != after.get(k)
    )
    if others:
        parts.append(f"{', '.join(others)} rewritten")
    return "; ".join(parts) or "reordered"


def _dvc_entry(document: dict[str, Any], spec: StageSpec) -> dict[str, Any] | None:
    """The stage's entry in a dvc.yaml mapping, a variant's `foreach` template expanded with its name."""
    stages = document.get("stages") or {}
    if spec.variant is None:
        return stages.get(spec.name)
    group = stages.get(variants_stage(spec.kind))
    if not isinstance(group, dict) or "do" not in group:
        return None
    return yaml.safe_load(yaml.safe_dump(group["do"]).replace("${key}", spec.variant))


def _listed(entries: Iterable[Any]) -> set[str]:
    return {str(next(iter(e)) if isinstance(e, dict) else e).rstrip("/") for e in entries or []}


def missing_declarations(spec: StageSpec, root: Path) -> list[str]:
    """What the recipe makes the stage read that dvc.yaml's entry for it does not declare: data deps (prepared
    data, mixtures, parent models, user files) and params keys, what a params edit moves. (Code deps are a
    fixed list per stage module; `posttrain validate` reports their drift.)

    Empty when there is no dvc.yaml or it has no such stage (a stage run by hand, outside DVC). A dep
    declared as a folder covers the paths inside it.
    """
    document = read_dvc_yaml(root)
    if document is None:
        return []
    entry = _dvc_entry(document, spec)
    if entry is None:
        return []  # not a DVC stage here: run by hand (`python -m stages.<name>`), DVC will not rerun it anyway
    deps, keys = _listed(entry.get("deps")), _listed(entry.get("params"))
    lines = [f"dep {dep}" for dep in spec.data_deps if not any(dep == d or dep.startswith(d + "/") for d in deps)]
    lines += [f"params key {key}" for key in spec.params_keys if key not in keys]
    return lines


def check_declared(spec: StageSpec, root: Path) -> None:
    """Refuse to run a stage whose dvc.yaml entry lacks what it reads: DVC would not rerun it when that changes."""
    missing = missing_declarations(spec, root)
    if missing:
        raise ParamsError(
            f"{root / DVC_FILE}: stage {spec.dvc_name} does not declare {', '.join(missing)}, which the recipe's "
            "stage reads; DVC would not rerun it when they change. Run `posttrain sync-deps` (dvc.yaml is "
            "generated from params.yaml)"
        )


def drift(params: Params, root: Path) -> list[str]:
    """Pipeline stages of dvc.yaml that differ from what params.yaml defines (`posttrain validate`, `status`).
    A hand-written dvc.yaml without any pipeline stage is a DAG of the user's own: nothing to compare."""
    document = read_dvc_yaml(root)
    if document is None:
        return []
    have = {name: entry for name, entry in (document.get("stages") or {}).items() if _is_pipeline_stage(name)}
    if not generated(root):
        if not have:
            return []
        return [
            f"{root / DVC_FILE} was not generated from params.yaml (hand-written, or by an older posttrain) but holds "
            f"pipeline stages {sorted(have)}; run `posttrain sync-deps` to write them from the recipe"
        ]
    want = render_stages(recipe_specs(params, root))
    return [
        f"{root / DVC_FILE} is behind params.yaml: {line}; run `posttrain sync-deps` (dvc.yaml is generated from it)"
        for line in _changes(have, want)
    ]
