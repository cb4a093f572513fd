"""Atomic writes, file hashing, redaction, and the parquet/JSON files of the data layer.

Writers never leave a half-written file or folder at the final path: they write a temporary
sibling and rename it into place (a rename within one file system is atomic).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import DataError

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def json_hash(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through a uniquely named temporary file and a rename (readers never see half a file, and
    two writers never share a temporary file); an existing file keeps its permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    """Write JSON through a temporary file and a rename (readers never see half a file)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False, default=str) + "\n")


def write_parquet(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str]) -> str:
    """Write rows with exactly `columns` (all strings) to `path` atomically; returns the file's sha256.

    An explicit schema keeps the columns when there are no rows, and building the table with
    pyarrow (not pandas) keeps pandas index metadata out, so equal rows give equal bytes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.string()) for name in columns])
    table = pa.Table.from_pylist([{name: row[name] for name in columns} for row in rows], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256_file(path)


def read_parquet(path: Path, columns: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Rows of a parquet file as dicts; a missing file or column is a DataError naming it."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    if columns is not None:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; file has {table.column_names}")
        table = table.select(list(columns))
    return table.to_pylist()


def write_json(data: Any, path: Path) -> None:
    """Atomic JSON with the caller's key order (manifests read top to bottom)."""
    write_json_atomic(path, data, sort_keys=False)


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
