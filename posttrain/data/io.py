"""Reading and atomic writing of the data layer's files (parquet tables, JSON manifests).

Writers never leave a half-written file or folder at the final path: they write a temporary
sibling and rename it into place (a rename within one file system is atomic).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import DataError
from posttrain.lineage import atomic_output_dir, sha256_file, temporary_sibling, write_json_atomic

_tmp_sibling = temporary_sibling


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
    tmp = _tmp_sibling(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(path)


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


# One implementation of hashing and atomic folders for the whole project (posttrain.lineage).
file_sha256 = sha256_file
atomic_dir = atomic_output_dir
