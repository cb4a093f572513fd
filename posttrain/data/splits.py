"""Deterministic train/val/test splits by a hash of (salt, item content).

An item's split depends on nothing but its own content and the salt, so it is the same on every
run, on every machine, whatever else is in the domain: appending items never moves an old one.
Test takes the lowest hash values and val the next band, so raising val_fraction never moves an
item out of test.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from posttrain.data.domains import Record

SPLITS = ("train", "val", "test")


def hash_unit(salt: str, record_id: str) -> float:
    """A uniform number in [0, 1) from (salt, item). The id is already a hash of the content."""
    digest = hashlib.sha256(f"{salt}\x00{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(record_id: str, salt: str, val_fraction: float, test_fraction: float) -> str:
    u = hash_unit(salt, record_id)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_records(
    records: Iterable[Record], salt: str, val_fraction: float, test_fraction: float
) -> dict[str, list[Record]]:
    """Records grouped by split, each split in the input order."""
    out: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for record in records:
        out[split_of(record["id"], salt, val_fraction, test_fraction)].append(record)
    return out
