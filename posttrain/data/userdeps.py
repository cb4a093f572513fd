"""User data files as DVC dependencies of `prepare` (so an edited file makes `prepare` stale).

DVC reruns a stage only for what dvc.yaml declares: a `kind: file` domain's data file that is not
among `prepare`'s deps can be edited without `dvc status` noticing, and training goes on with the
old data. DVC 3 templating cannot build a deps list from a params mapping (only `foreach` over
stages, and `${...}` of scalars), so the deps are written into dvc.yaml itself: `prepare` refuses
to run while a file it reads is not declared (naming the file and the fix), `posttrain validate`
reports it, and `posttrain sync-deps` / `posttrain run` add it. DVC then tracks it by content.

Hub datasets cannot be a file dependency: a hub id must pin `revision` (a local folder given as
the dataset name is a dependency like a file).

The same holds for `pretrain`: it reads the prepared data of the tokenizer's domains only
(`model.tokenizer.domains`, so a new CPT domain never reruns it), one dep per domain,
`artifacts/data/prepared/<domain>`; `sync_pretrain` makes that list match the recipe's domains
(a recipe with other domains than the default one gets its own list, nothing missing or extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from posttrain.config import DataConfig
from posttrain.dvcfile import stage_entry
from posttrain.errors import UndeclaredDataError

STAGE = "prepare"
PRETRAIN = "pretrain"
PREPARED = "artifacts/data/prepared"


def _dep_path(path: str, root: Path) -> str:
    """The path as dvc.yaml names it: relative to the project root when inside it, else absolute."""
    given = Path(path)
    full = given if given.is_absolute() else root / given
    try:
        return full.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(full.resolve())


def user_files(data: DataConfig, root: Path) -> dict[str, str]:
    """'data.domains.<name>.path' (or '.name') -> the file/folder `prepare` reads, as a dvc.yaml dep."""
    files: dict[str, str] = {}
    for name, domain in data.domains.items():
        if domain.kind == "file":
            files[f"data.domains.{name}.path"] = _dep_path(domain.path, root)
        elif domain.kind == "hub":
            local = Path(domain.name) if Path(domain.name).is_absolute() else root / domain.name
            if local.exists():
                files[f"data.domains.{name}.name"] = _dep_path(domain.name, root)
    return files


def unpinned_hub(data: DataConfig, root: Path) -> list[str]:
    """Keys of hub datasets (not local folders) without a `revision`: their content can change unseen."""
    keys = []
    for name, domain in data.domains.items():
        if (
            domain.kind == "hub"
            and domain.revision is None
            and f"data.domains.{name}.name" not in user_files(data, root)
        ):
            keys.append(f"data.domains.{name}.revision")
    return keys


def declared_deps(root: Path, stage_name: str = STAGE) -> list[str] | None:
    """A stage's deps in dvc.yaml (paths as written); None when dvc.yaml has no such stage."""
    try:
        stage = stage_entry(root, stage_name)
    except (OSError, yaml.YAMLError) as error:
        raise UndeclaredDataError(f"{root / 'dvc.yaml'}: cannot be read ({error})") from None
    if stage is None:
        return None
    return [str(next(iter(dep))) if isinstance(dep, dict) else str(dep) for dep in stage.get("deps") or []]


def _covered(path: str, deps: list[str]) -> bool:
    """A dep covers the path itself or anything inside a declared folder."""
    for dep in deps:
        dep = dep.rstrip("/")
        if path == dep or path.startswith(dep + "/"):
            return True
    return False


def missing(data: DataConfig, root: Path) -> dict[str, str]:
    """The user files `prepare` reads that dvc.yaml does not declare, by params key."""
    files = user_files(data, root)
    if not files or not (root / "dvc.yaml").is_file():
        return {}  # outside a DVC project (a stage function called directly) nothing can go stale
    deps = declared_deps(root)
    if deps is None:
        return {}  # a dvc.yaml without `prepare` (a toy pipeline): no stage reads these files
    return {key: path for key, path in files.items() if not _covered(path, deps)}


def problems(data: DataConfig, root: Path, undeclared: bool = True) -> list[str]:
    """One line per undeclared file (when `undeclared`) or unpinned hub dataset, each with its fix."""
    lines = [
        f"{key} = {path!r} is read by '{STAGE}' but is not a dependency in dvc.yaml, so DVC would not see "
        "edits to it; run `posttrain sync-deps` (or add it under stages.prepare.deps)"
        for key, path in (missing(data, root) if undeclared else {}).items()
    ]
    lines += [
        f"{key}: not set; a hub dataset can change without DVC seeing it. Pin a commit or tag, e.g. "
        "revision: <commit sha>"
        for key in unpinned_hub(data, root)
    ]
    return lines


def check(data: DataConfig, root: Path) -> None:
    """Refuse to prepare data whose source DVC does not track (see the module docstring)."""
    found = problems(data, root)
    if found:
        raise UndeclaredDataError("; ".join(found))


def sync(data: DataConfig, root: Path) -> list[str]:
    """Add every undeclared user file to `prepare`'s deps in dvc.yaml; returns them."""
    return add_deps(root, sorted(set(missing(data, root).values())))


def pretrain_drift(domains: list[str], root: Path) -> tuple[list[str], list[str]]:
    """(missing, extra): `artifacts/data/prepared/<domain>` deps of pretrain against `domains`."""
    if not (root / "dvc.yaml").is_file():
        return [], []
    deps = declared_deps(root, PRETRAIN)
    if deps is None or PREPARED in [d.rstrip("/") for d in deps]:
        return [], []  # no pretrain stage, or it depends on all prepared data
    want = [f"{PREPARED}/{domain}" for domain in domains]
    have = [d.rstrip("/") for d in deps if d.rstrip("/").startswith(PREPARED + "/")]
    return [d for d in want if d not in have], [d for d in have if d not in want]


def pretrain_problems(domains: list[str], root: Path) -> list[str]:
    missing_deps, extra = pretrain_drift(domains, root)
    lines = [f"{d} is read by '{PRETRAIN}' (model.tokenizer.domains) but is not among its deps" for d in missing_deps]
    lines += [f"{d} is a dep of '{PRETRAIN}' but no tokenizer domain of params.yaml is there" for d in extra]
    return [f"{line}; run `posttrain sync-deps`" for line in lines]


def sync_pretrain(domains: list[str], root: Path) -> tuple[list[str], list[str]]:
    """Make pretrain's prepared-domain deps exactly `domains` in dvc.yaml; returns (added, removed)."""
    missing_deps, extra = pretrain_drift(domains, root)
    if missing_deps or extra:
        _edit_deps(root, PRETRAIN, add=missing_deps, remove=extra)
    return missing_deps, extra


def add_deps(root: Path, paths: list[str]) -> list[str]:
    """Add `paths` (not yet covered) to `prepare`'s deps in dvc.yaml, comments and layout kept."""
    deps = declared_deps(root)
    absent = [path for path in paths if deps is not None and not _covered(path, deps)]
    if absent:
        _edit_deps(root, STAGE, add=absent)
    return absent


def _edit_deps(root: Path, stage: str, add: list[str], remove: list[str] | None = None) -> None:
    # lazy: ruamel.yaml (DVC's own YAML library, keeps dvc.yaml's comments and layout) is needed only to edit
    from ruamel.yaml import YAML

    editor = YAML()
    editor.preserve_quotes = True
    path = root / "dvc.yaml"
    document: Any = editor.load(path.read_text())
    deps = document["stages"][stage].setdefault("deps", [])
    for dep in remove or []:
        for i in reversed(range(len(deps))):
            if str(deps[i]).rstrip("/") == dep:
                del deps[i]
    deps.extend(add)
    tmp = path.with_name(".dvc.yaml.tmp")
    with tmp.open("w") as handle:
        editor.dump(document, handle)
    tmp.replace(path)
