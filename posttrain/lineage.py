"""Lineage records and content hashes of model folders, and atomic output folders.

Every model folder a stage writes carries `lineage.json`: what made it (stage, params, seed, data
manifest, git state, library versions) and the sha256 of each of its files. The next stage checks
those hashes when it loads the folder, so a corrupted or half-copied model is caught at the boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain.errors import StageError

LINEAGE_FILE = "lineage.json"
TRACKED_LIBRARIES = ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "tokenizers")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative POSIX paths), lineage.json excluded."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != LINEAGE_FILE
    }


def content_hash(hashes: dict[str, str]) -> str:
    """One hash over a folder's file hashes: equal folders have equal content hashes."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def json_hash(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def git_state(root: Path) -> dict[str, Any]:
    """Commit and dirty flag of the project's git checkout (None when it is not a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # Only tracked files count: outputs and checkpoints are ignored or DVC-managed.
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# Matched only where "://" occurs (see _redact_uris): tried at every position, the scheme's
# `[a-z...]*` made redaction quadratic; a 10 MB params string never returned.
_SCHEME_BEFORE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]{0,31}\Z")
_CREDENTIALS_AFTER = re.compile(r"(?P<user>[^:/@\s]+):(?P<password>[^@/\s]+)@")
_SECRET_KEYS = re.compile(r"(token|password|secret|api[_-]?key)", re.IGNORECASE)


def _redact_uris(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`, in time linear in len(text).

    Each credentials match starts right after a "://" and stops at the next '/', so the scans
    never overlap.
    """
    parts: list[str] = []
    done = 0
    at = text.find("://")
    while at != -1:
        start = at + 3
        if _SCHEME_BEFORE.search(text, max(0, at - 32), at):
            found = _CREDENTIALS_AFTER.match(text, start)
            if found:
                parts.append(text[done:start] + found["user"] + ":***@")
                done = found.end()
        at = text.find("://", max(start, done))
    return "".join(parts) + text[done:] if parts else text


def redact(value: Any) -> Any:
    """Remove secrets before anything is logged or recorded: passwords in URIs, *token*/*password* keys."""
    if isinstance(value, str):
        return _redact_uris(value)
    if isinstance(value, dict):
        return {key: ("***" if _SECRET_KEYS.search(str(key)) and item else redact(item)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    return value


def read_lineage(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StageError(f"{path}: lineage record is not valid JSON ({error})") from None


def verify_model_folder(model_dir: Path) -> dict[str, Any] | None:
    """Recompute the folder's file hashes and compare them with its lineage record.

    Returns the lineage record (None for a folder without one, e.g. a user's own model).
    Raises StageError naming the file and both hashes when anything changed.
    """
    if not model_dir.is_dir():
        raise StageError(f"model folder {model_dir} does not exist; has the stage that writes it run?")
    lineage = read_lineage(model_dir)
    if lineage is None:
        return None
    recorded: dict[str, str] = lineage.get("files", {})
    actual = file_hashes(model_dir)
    for name in sorted(set(recorded) | set(actual)):
        if recorded.get(name) != actual.get(name):
            raise StageError(
                f"{model_dir / name}: content does not match its lineage record "
                f"(recorded sha256 {recorded.get(name)}, found {actual.get(name)}); "
                "the model folder was modified or corrupted after it was written"
            )
    return lineage


def parent_entry(model_dir: Path, root: Path, weight: float | None = None) -> dict[str, Any]:
    """How a child records one parent model: its stage, path and content hash."""
    lineage = read_lineage(model_dir) or {}
    try:
        shown = model_dir.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        shown = str(model_dir)
    return {
        "stage": lineage.get("stage"),
        "path": shown,
        "content_hash": lineage.get("content_hash") or content_hash(file_hashes(model_dir)),
        "weight": weight,
    }


def write_lineage(
    model_dir: Path,
    *,
    stage: str,
    root: Path,
    parents: list[dict[str, Any]],
    params: dict[str, Any],
    params_hash: str,
    seed: int | None,
    data_manifest: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write lineage.json into a finished model folder (call it last, once every file is written)."""
    hashes = file_hashes(model_dir)
    record = {
        "stage": stage,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parents": parents,
        "content_hash": content_hash(hashes),
        "files": hashes,
        "data_manifest_hash": json_hash(data_manifest) if data_manifest else None,
        "params_hash": params_hash,
        "params": redact(params),
        "seed": seed,
        "git": git_state(root),
        "versions": library_versions(),
        "command": redact(" ".join(sys.argv)),
        **(extra or {}),
    }
    (model_dir / LINEAGE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


@contextlib.contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    A killed or failing stage leaves `final` as it was (or absent), never half-written, so neither
    DVC nor the next stage can take a partial output for a finished one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The old folder is moved aside first, so `final` is always a complete old or new output.
    old = temporary_sibling(final) if final.exists() else None
    if old is not None:
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def temporary_sibling(path: Path) -> Path:
    """A hidden, unique name beside `path` (unique per process and call: concurrent writers never collide)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_json_atomic(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    """Write JSON through a temporary file and a rename (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
