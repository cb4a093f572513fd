"""A trainer stage's data: its training mixture (columns and lengths checked) and its validation items.

TRL truncates over-long examples silently; `check_lengths` refuses them by default. The "first
`eval_items` validation items of each domain" that continual evaluation, DPO's held-out pairs and
GRPO's held-out prompts use are read by `first_validation_items`, once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from posttrain import io
from posttrain.config import TrainStageConfig
from posttrain.data.domains import RECORD_COLUMNS, Record
from posttrain.errors import DataError
from posttrain.layout import Layout

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def read_mixture(layout: Layout, stage: str, columns: Sequence[str]) -> datasets.Dataset:
    """The stage's training mixture with exactly `columns` (DataError naming a missing column)."""
    # lazy: datasets, pandas are heavy to import; only this path needs them
    import datasets
    import pandas as pd

    path = layout.mixture(stage) / "train.parquet"
    if not path.is_file():
        raise DataError(f"{path}: training mixture not found; run the mix stage first (python -m stages.mix)")
    frame = pd.read_parquet(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}, expected {list(columns)}")
    if frame.empty:
        raise DataError(f"{path}: the training mixture has no rows; expected at least one")
    for column in columns:
        bad = frame[column].isna()
        if bad.any():
            row = frame.index[bad][0]
            raise DataError(f"{path}: row {row} has an empty '{column}'; expected a string")
    return datasets.Dataset.from_pandas(frame[list(columns)], preserve_index=False)


def check_lengths(
    texts: Sequence[str],
    ids: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    on_too_long: Literal["truncate", "refuse"],
    where: str,
) -> int:
    """Count examples longer than `max_length` tokens (EOS included); with `refuse`, fail on the first.

    TRL truncates silently; a cut example loses its answer or its EOS, so by default we refuse.
    """
    lengths = [len(ids_) + 1 for ids_ in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long and on_too_long == "refuse":
        i = too_long[0]
        raise DataError(
            f"{where}: {len(too_long)} example(s) longer than max_length={max_length} tokens, first id {ids[i]!r} "
            f"with {lengths[i]} tokens ({texts[i][:60]!r}); raise max_length or set on_too_long: truncate"
        )
    if too_long:
        log.warning("%s: %d example(s) longer than %d tokens are truncated", where, len(too_long), max_length)
    return len(too_long)


def load_text_mixture(
    layout: Layout, stage: str, tokenizer: PreTrainedTokenizerBase, section: TrainStageConfig
) -> datasets.Dataset:
    """Language-modelling data: the mixture's `text` column, lengths checked (TRL appends EOS)."""
    data = read_mixture(layout, stage, ["id", "text"])
    where = str(layout.mixture(stage) / "train.parquet")
    check_lengths(data["text"], data["id"], tokenizer, section.max_length, section.on_too_long, where)
    return data.select_columns(["text"])


def load_prompt_completion_mixture(
    layout: Layout, stage: str, tokenizer: PreTrainedTokenizerBase, section: TrainStageConfig
) -> datasets.Dataset:
    """Prompt-completion data (`prompt`, `completion`), lengths of prompt + completion + EOS checked."""
    data = read_mixture(layout, stage, ["id", "prompt", "completion"])
    where = str(layout.mixture(stage) / "train.parquet")
    texts = [p + c for p, c in zip(data["prompt"], data["completion"], strict=False)]
    check_lengths(texts, data["id"], tokenizer, section.max_length, section.on_too_long, where)
    return data.select_columns(["prompt", "completion"])


def mixture_manifest(layout: Layout, stage: str) -> Path:
    return layout.mixture(stage) / "manifest.json"


@dataclass
class ValidationSet:
    """First `eval_items` validation items of one domain: `text` for loss, `prompt`/`answer` for exact match."""

    domain: str
    texts: list[str]
    prompts: list[str]
    answers: list[str]


def first_validation_items(
    layout: Layout, domains: Sequence[str], items: int, columns: Sequence[str] = RECORD_COLUMNS
) -> list[Record]:
    """The first `items` records of each domain's val split, in domain order (DataError for a missing split).

    The one definition of the held-out items a trainer stage scores itself on: continual evaluation,
    DPO's held-out pairs and GRPO's held-out prompts all read them here.
    """
    records: list[Record] = []
    for domain in domains:
        records += io.read_parquet(layout.prepared_split(domain, "val"), columns)[:items]
    return records


def load_validation_sets(layout: Layout, domains: Sequence[str], eval_items: int) -> dict[str, ValidationSet]:
    """Per-domain validation sets; a domain without a val split is skipped with a warning."""
    sets: dict[str, ValidationSet] = {}
    for domain in domains:
        path = layout.prepared_split(domain, "val")
        if not path.is_file():
            log.warning("continual evaluation: %s not found, domain %s skipped", path, domain)
            continue
        rows = [
            {k: row[k] or "" for k in ("text", "prompt", "answer")}
            for row in first_validation_items(layout, [domain], eval_items, ("text", "prompt", "answer"))
        ]
        if not rows:
            continue
        verifiable = [row for row in rows if row["prompt"] != "" and row["answer"] != ""]
        sets[domain] = ValidationSet(
            domain=domain,
            texts=[row["text"] for row in rows],
            prompts=[row["prompt"] for row in verifiable],
            answers=[row["answer"] for row in verifiable],
        )
    return sets
