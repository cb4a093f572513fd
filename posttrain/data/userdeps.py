"""User data files as DVC dependencies of `prepare` (so an edited file makes `prepare` stale).

DVC reruns a stage only for what dvc.yaml declares: a `kind: file` domain's data file that is not
among `prepare`'s deps can be edited without `dvc status` noticing, and training goes on with the
old data. DVC 3 templating cannot build a deps list from a params mapping (only `foreach` over
stages, and `${...}` of scalars), so the deps are written into dvc.yaml itself: `prepare` refuses
to run while a file it reads is not declared (naming the file and the fix), `posttrain validate`
reports it, and `posttrain sync-deps` / `posttrain run` add it. DVC then tracks it by content.

Hub datasets cannot be a file dependency: a hub id must pin `revision` (a local folder given as
the dataset name is a dependency like a file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from posttrain.config import DataConfig
from posttrain.dvcfile import stage_entry
from posttrain.errors import UndeclaredDataError

STAGE = "prepare"


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


def declared_deps(root: Path) -> list[str] | None:
    """`prepare`'s deps in dvc.yaml (paths as written); None when dvc.yaml has no `prepare` stage."""
    try:
        stage = stage_entry(root, STAGE)
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


def add_deps(root: Path, paths: list[str]) -> list[str]:
    """Add `paths` (not yet covered) to `prepare`'s deps in dvc.yaml, comments and layout kept."""
    deps = declared_deps(root)
    absent = [path for path in paths if deps is not None and not _covered(path, deps)]
    if not absent:
        return []
    # lazy: ruamel.yaml (DVC's own YAML library, keeps dvc.yaml's comments and layout) is needed only to edit
    from ruamel.yaml import YAML

    editor = YAML()
    editor.preserve_quotes = True
    path = root / "dvc.yaml"
    document: Any = editor.load(path.read_text())
    document["stages"][STAGE].setdefault("deps", []).extend(absent)
    tmp = path.with_name(".dvc.yaml.tmp")
    with tmp.open("w") as handle:
        editor.dump(document, handle)
    tmp.replace(path)
    return absent
