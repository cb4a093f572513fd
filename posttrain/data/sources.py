"""User data sources: local files (JSONL, CSV, Parquet) and `datasets` hub ids.

A source gives one of TRL's standard formats (posttrain.data.formats): text, prompt+answer,
prompt+completion, conversational messages, or preference pairs, standard or conversational.
`columns` maps record fields onto the source's columns; unmapped fields use their own name. The
format is the first of formats.SOURCE_MODES whose fields are all present.

Every bad row is a DataError naming the file, the line or row and the field, unless the domain
sets `skip_bad_rows: true`: then bad rows are dropped, counted and logged. Problems with the
whole source (missing file, missing column, nothing left) always fail.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import FileDomain, HubDomain
from posttrain.data.domains import Record, make_record
from posttrain.data.formats import BadRow, BadSource, parse_row, resolve_mode
from posttrain.errors import DataError

log = logging.getLogger("posttrain.data")

# File suffix -> format: what a `kind: file` domain and the continual flow's incoming folder read.
FILE_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass
class SourceReport:
    """What loading a source did, for the prepare manifest."""

    source: str
    rows: int = 0
    skipped: int = 0
    duplicates: int = 0
    mode: str = ""
    problems: list[str] = field(default_factory=list)  # the first few skipped rows, for the log

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "skipped_bad_rows": self.skipped,
            "duplicates_dropped": self.duplicates,
            "mode": self.mode,
            "first_problems": self.problems,
        }


_BadRow = BadRow


def _resolve_mode(columns: dict[str, str], available: Iterable[str] | None, where: str) -> tuple[str, dict[str, str]]:
    """(format, record field -> source column); a source without a known format is a DataError."""
    try:
        return resolve_mode(columns, list(available or ()), where)
    except BadSource as error:
        raise DataError(str(error)) from None


def _value(row: dict[str, Any], field_name: str, column: str, where: str) -> Any:
    """The row's value for a field: missing and null are bad rows; types are checked by parse_row."""
    if column not in row:
        raise _BadRow(f"{where}: field '{field_name}' (column '{column}') is missing")
    value = row[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise _BadRow(f"{where}: field '{field_name}' (column '{column}') is empty (null)")
    if isinstance(value, (str, list)):
        return value
    raise _BadRow(
        f"{where}: field '{field_name}' (column '{column}') is {type(value).__name__} {value!r}, "
        "expected a string (quote it in the file) or a list of messages"
    )


def _collect(
    domain: str,
    rows: Iterator[tuple[str, dict[str, Any] | _BadRow]],
    mode: str,
    mapping: dict[str, str],
    verifier: str,
    skip_bad_rows: bool,
    report: SourceReport,
) -> list[Record]:
    """Turn (location, row) pairs into records, validating each; deduplicate by id."""
    records: list[Record] = []
    seen: set[str] = set()
    for where, row in rows:
        report.rows += 1
        try:
            if isinstance(row, _BadRow):
                raise row
            if not isinstance(row, dict):
                raise _BadRow(f"{where}: expected an object with fields, got {type(row).__name__}")
            values = {f: _value(row, f, c, where) for f, c in mapping.items()}
            fields = parse_row(values, mode, where, mapping)
        except _BadRow as bad:
            if not skip_bad_rows:
                raise DataError(str(bad)) from None
            report.skipped += 1
            if len(report.problems) < 5:
                report.problems.append(str(bad))
            continue
        # Only items with a gold answer are checked by a verifier.
        record = make_record(domain, **fields, verifier=verifier if fields.get("answer") else "")
        if record["id"] in seen:
            report.duplicates += 1
            continue
        seen.add(record["id"])
        records.append(record)
    if report.skipped:
        log.warning(
            "domain %s: skipped %d bad row(s) of %s; first: %s",
            domain,
            report.skipped,
            report.source,
            "; ".join(report.problems[:3]),
        )
    if report.duplicates:
        log.info("domain %s: dropped %d duplicate row(s) of %s", domain, report.duplicates, report.source)
    if not records:
        extra = f" ({report.skipped} bad row(s) skipped)" if report.skipped else ""
        raise DataError(f"{report.source}: no usable rows{extra}; expected at least one item")
    return records


# --------------------------------------------------------------------------- files


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:
        return FILE_SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"{path}: cannot tell the format from suffix '{path.suffix}'; expected one of "
            f"{sorted(FILE_SUFFIXES)} or set `format:` (jsonl, csv, parquet)"
        ) from None


def _jsonl_rows(path: Path, data: bytes) -> Iterator[tuple[str, dict[str, Any] | _BadRow]]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}: line {number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            yield where, _BadRow(f"{where}: not valid UTF-8 (byte {error.start + 1} of the line)")
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            yield where, _BadRow(f"{where}: invalid JSON ({error.msg} at column {error.colno})")


def _jsonl_keys(rows: list[tuple[str, Any]]) -> list[str]:
    """Every key used by any object row (the mode is decided on the file, not its first line)."""
    keys: dict[str, None] = {}
    for _, row in rows:
        if isinstance(row, dict):
            keys.update(dict.fromkeys(row))
    return list(keys)


def _csv_text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        # One bad byte breaks the CSV parser's view of the whole file: always fatal.
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8; expected a UTF-8 encoded file") from None


def _not_a_file(path: Path) -> str:
    """Why `path` cannot be read as a data file, in the user's terms."""
    if path.is_dir():
        return "is a directory; expected a data file (JSONL, CSV or Parquet)"
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:
            return "is a symlink loop; expected a data file"
        except OSError:
            return f"is a symlink to {path.readlink()}, which does not exist"
    if path.exists():
        return "is not a regular file; expected a data file (JSONL, CSV or Parquet)"
    return "file not found"


def load_file(domain: str, config: FileDomain, root: Path, verifier: str) -> tuple[list[Record], SourceReport]:
    """Records from a FileDomain config; relative paths are relative to the project root."""
    path = Path(config.path)
    if not path.is_absolute():
        path = root / path
    report = SourceReport(source=str(path))
    if not path.is_file():
        raise DataError(f"{path}: {_not_a_file(path)} (data.domains.{domain}.path = {config.path!r})")
    fmt = _file_format(path, config.format)
    report.source = f"{path} ({fmt})"
    if fmt == "jsonl":
        data = path.read_bytes()
        if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            raise DataError(
                f"{path}: holds a JSON array; expected JSON Lines, one object per line "
                f"(convert it with: jq -c '.[]' {path.name} > {path.stem}.jsonl)"
            )
        parsed = list(_jsonl_rows(path, data))
        _require_rows(path, parsed)
        mode, mapping = _resolve_mode(config.columns, _jsonl_keys(parsed), str(path))
        rows: Iterator[tuple[str, Any]] = iter(parsed)
    elif fmt == "csv":
        reader = csv.DictReader(io.StringIO(_csv_text(path, path.read_bytes()), newline=""))
        header = reader.fieldnames or []
        if not header:
            raise DataError(f"{path}: the file is empty; expected a header line and rows")
        mode, mapping = _resolve_mode(config.columns, header, str(path))
        _require_columns(path, mapping, header)

        def csv_rows() -> Iterator[tuple[str, Any]]:
            for number, row in enumerate(reader, start=1):
                # DictReader fills short rows with None, which _value reports as empty.
                yield f"{path}: row {number} (line {reader.line_num})", row

        rows = csv_rows()
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable parquet file ({error})") from None
        if table.num_rows == 0:
            raise DataError(f"{path}: the file has no rows (columns {table.column_names}); expected at least one item")
        mode, mapping = _resolve_mode(config.columns, table.column_names, str(path))
        _require_columns(path, mapping, table.column_names)
        table = table.select(list(dict.fromkeys(mapping.values())))
        rows = ((f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist(), start=1))
    report.mode = mode
    records = _collect(domain, rows, mode, mapping, verifier, config.skip_bad_rows, report)
    return records, report


def _require_rows(path: Path, parsed: list[tuple[str, Any]]) -> None:
    """An empty file, or one whose every line is unreadable, says so (not 'no known columns')."""
    if not parsed:
        raise DataError(f"{path}: the file is empty; expected one JSON object per line")
    if all(isinstance(row, _BadRow) for _, row in parsed):
        raise DataError(f"no readable line: {parsed[0][1]}")


def _require_columns(path: Path | str, mapping: dict[str, str], available: list[str]) -> None:
    for field_name, column in mapping.items():
        if column not in available:
            raise DataError(
                f"{path}: missing column '{column}' for field '{field_name}'; the source has columns {list(available)}"
            )


# --------------------------------------------------------------------------- hub


def load_hub(domain: str, config: HubDomain, verifier: str) -> tuple[list[Record], SourceReport]:
    """Records from a HubDomain config via datasets.load_dataset (a hub id, or a local folder)."""
    import datasets  # heavy: imported only when a hub domain exists

    label = (
        f"dataset {config.name!r}"
        + (f" subset {config.subset!r}" if config.subset else "")
        + f" split {config.split!r}"
    )
    report = SourceReport(source=label)
    try:
        dataset = datasets.load_dataset(config.name, config.subset, split=config.split, revision=config.revision)
    except Exception as error:  # network, missing cache, unknown split, bad files: all the user's to fix
        raise DataError(
            f"{label} (data.domains.{domain}): could not be loaded: {type(error).__name__}: {error}. "
            "Hub datasets need network access or a local cache (HF_DATASETS_OFFLINE=1 uses the cache only)"
        ) from None
    if config.max_items is not None and len(dataset) > config.max_items:
        dataset = dataset.select(range(config.max_items))
    mode, mapping = _resolve_mode(config.columns, dataset.column_names, label)
    _require_columns(label, mapping, dataset.column_names)
    rows = ((f"{label}: row {i}", row) for i, row in enumerate(dataset, start=1))
    report.mode = mode
    records = _collect(domain, rows, mode, mapping, verifier, config.skip_bad_rows, report)
    return records, report
