"""Lineage records and content hashes of model folders.

Every model folder a stage writes carries `lineage.json`: what made it (stage, params, seed, data
manifest, git state, library versions) and the sha256 of each of its files. The next stage checks
those hashes when it loads the folder, so a corrupted or half-copied model is caught at the boundary.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain.errors import StageError
from posttrain.io import json_hash, redact, sha256_file, write_json_atomic

LINEAGE_FILE = "lineage.json"
TRACKED_LIBRARIES = ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "tokenizers")


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


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; else what `platform` knows): numerics differ between CPUs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def add_environment(metrics_path: Path) -> None:
    """Record the CPU model, platform and library versions in a stage's metrics file (if it wrote one)."""
    if not metrics_path.is_file():
        return
    metrics = json.loads(metrics_path.read_text())
    metrics["environment"] = {"cpu": cpu_model(), "platform": platform.platform(), "libraries": library_versions()}
    write_json_atomic(metrics_path, metrics)


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
        # Checked by every later stage (posttrain.models.chat_template.check_against_lineage).
        "chat_template_fingerprint": lineage.get("chat_template_fingerprint"),
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
