"""A stage's entry in dvc.yaml, read with yaml (not DVC): its deps and the values of its params.

Every stage process reads these (checkpoint keys, the params recorded in MLflow, pretrain's deps
check); importing DVC costs seconds, and these need nothing but the file itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import ParamsError


def stage_entry(root: Path, stage: str) -> dict[str, Any] | None:
    """The stage's mapping in <root>/dvc.yaml (None: no dvc.yaml or no such stage)."""
    path = root / "dvc.yaml"
    if not path.is_file():
        return None
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    entry = stages.get(stage)
    if entry is not None and not isinstance(entry, dict):
        raise ParamsError(f"{path}: stage {stage!r} is {type(entry).__name__}; expected a mapping with cmd/deps")
    return entry


def stage_deps(root: Path, stage: str) -> list[str] | None:
    """The stage's deps as dvc.yaml lists them (None: no dvc.yaml or no such stage in it)."""
    entry = stage_entry(root, stage)
    return None if entry is None else [str(d).rstrip("/") for d in entry.get("deps") or []]


def _lookup(raw: dict[str, Any], dotted: str, where: str) -> Any:
    value: Any = raw
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ParamsError(f"{where}: key {dotted!r} (listed in dvc.yaml) not found")
        value = value[part]
    return value


def stage_params(root: Path, stage: str) -> dict[str, Any]:
    """The values of the params keys dvc.yaml lists for the stage (default file params.yaml)."""
    entry = stage_entry(root, stage) or {}
    values: dict[str, Any] = {}
    cache: dict[str, dict[str, Any]] = {}

    def raw(file: str) -> dict[str, Any]:
        if file not in cache:
            cache[file] = yaml.safe_load((root / file).read_text()) or {}
        return cache[file]

    for item in entry.get("params") or []:
        if isinstance(item, dict):  # {other.yaml: [keys]}
            for file, keys in item.items():
                for key in keys or []:
                    values[f"{file}:{key}"] = _lookup(raw(file), key, str(root / file))
        else:
            values[str(item)] = _lookup(raw("params.yaml"), str(item), str(root / "params.yaml"))
    return values
