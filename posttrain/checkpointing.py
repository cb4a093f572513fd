"""Which checkpoints a run may resume, and which are cleaned up.

A checkpoint folder is `checkpoints/<stage>-<key>/`. The key hashes everything that determines the
run's result:

    code      the contents of the stage's code deps as dvc.yaml lists them (every dep outside
              artifacts/: files, and folders recursively without __pycache__/*.pyc), i.e. the
              same files DVC hashes to decide the stage is stale
    params    the values of the params keys dvc.yaml lists for the stage, read from params.yaml
    inputs    the caller's: data manifest and parent model content hashes, world size, device,
              precision, thread count, seed, the stage's typed section

So a checkpoint whose code, params or inputs differ from this run's is never resumed. Each folder
holds `key.json` with those components, so the log can say why an existing folder was skipped.

Cleaning rule: at a stage's start the newest KEEP_KEYS key folders of that stage (by modification
time, the current key always among them) are kept and older ones deleted; `posttrain clean` applies
the same rule to every stage, `posttrain clean --all` deletes every checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from posttrain.config import ParamsError, params_hash
from posttrain.lineage import sha256_file, write_json_atomic

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
KEEP_KEYS = 2  # key folders kept per stage: the current run's and the one before it
_DATA_PREFIX = "artifacts/"  # deps under here are data/models, keyed by their content hashes instead


def stage_entry(root: Path, stage: str) -> dict[str, Any] | None:
    """The stage's mapping in <root>/dvc.yaml (None: no dvc.yaml or no such stage). Read with yaml,
    not DVC: every stage process calls this, and importing DVC costs seconds."""
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


def code_deps(root: Path, stage: str) -> list[str]:
    """The stage's deps in dvc.yaml that are code (not under artifacts/), as written there."""
    entry = stage_entry(root, stage) or {}
    return [str(d) for d in entry.get("deps") or [] if not str(d).startswith(_DATA_PREFIX)]


def code_hashes(root: Path, deps: list[str]) -> dict[str, str]:
    """sha256 of every file of the code deps, by path relative to root (folders walked recursively)."""
    hashes: dict[str, str] = {}
    for dep in deps:
        path = root / dep
        if path.is_file():
            hashes[dep] = sha256_file(path)
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if "__pycache__" in file.parts or file.suffix == ".pyc":
                    continue
                hashes[file.relative_to(root).as_posix()] = sha256_file(file)
        else:
            raise ParamsError(f"{root / 'dvc.yaml'}: a dep of stage, {dep!r}, does not exist under {root}")
    return hashes


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


def key_components(root: Path, stage: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """What the key hashes: code file hashes, dvc.yaml params values, and the caller's inputs."""
    if stage_entry(root, stage) is None:
        log.warning("%s: stage %r not in dvc.yaml; its checkpoint key covers params and inputs only", root, stage)
    return {
        "stage": stage,
        "code": code_hashes(root, code_deps(root, stage)),
        "params": stage_params(root, stage),
        "inputs": inputs,
    }


def key_of(components: dict[str, Any]) -> str:
    return params_hash(components)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable reasons two key components differ, e.g. 'code posttrain/adapters.py changed'."""
    reasons: list[str] = []
    for part in ("code", "params", "inputs"):
        a, b = old.get(part) or {}, new.get(part) or {}
        for name in sorted(set(a) | set(b)):
            if name not in a:
                reasons.append(f"{part} {name} added")
            elif name not in b:
                reasons.append(f"{part} {name} removed")
            elif a[name] != b[name]:
                reasons.append(f"{part} {name} changed")
    return reasons or ["key differs (made by an older key scheme)"]


def stage_folders(checkpoints: Path, stage: str) -> list[Path]:
    """Key folders of `stage` under checkpoints/, newest first (by modification time)."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.rsplit("-", 1)[0] == stage]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def prepare_folder(folder: Path, components: dict[str, Any], *, clean: bool, keep: int = KEEP_KEYS) -> None:
    """Before training: log why other key folders of the stage are not resumed, record this key's
    components in the folder, and (with `clean`, the main process) apply the cleaning rule."""
    stage = components["stage"]
    for other in stage_folders(folder.parent, stage):
        if other == folder:
            continue
        try:
            reasons = _differences(json.loads((other / KEY_FILE).read_text()), components)
        except (OSError, json.JSONDecodeError):
            reasons = [f"no readable {KEY_FILE} (made by an older key scheme)"]
        log.info("%s: checkpoint folder %s skipped, made from other inputs: %s", stage, other, "; ".join(reasons))
    if clean:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / KEY_FILE, components)  # also marks this key as the newest
        clean_stage(folder.parent, stage, keep=keep)


def clean_stage(checkpoints: Path, stage: str, keep: int = KEEP_KEYS) -> list[Path]:
    """Delete all but the newest `keep` key folders of `stage`; returns the deleted folders."""
    removed = stage_folders(checkpoints, stage)[keep:]
    for folder in removed:
        log.info("%s: removing old checkpoint folder %s (keeping the newest %d keys)", stage, folder, keep)
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def clean(checkpoints: Path, keep: int = KEEP_KEYS, everything: bool = False) -> list[Path]:
    """`posttrain clean`: the cleaning rule for every stage, or (`everything`) remove all checkpoints."""
    if not checkpoints.is_dir():
        return []
    if everything:
        removed = sorted(p for p in checkpoints.iterdir())
        shutil.rmtree(checkpoints)
        return removed
    stages = sorted({p.name.rsplit("-", 1)[0] for p in checkpoints.iterdir() if p.is_dir()})
    return [path for stage in stages for path in clean_stage(checkpoints, stage, keep=keep)]
