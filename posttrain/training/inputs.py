"""A trainer stage's data: its training mixture (columns and lengths checked) and its validation items.

TRL truncates over-long examples silently; `check_lengths` refuses them by default. The "first
`eval_items` validation items of each domain" that continual evaluation, DPO's held-out pairs and
GRPO's held-out prompts use are read by `first_validation_items`, once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from posttrain import io
from posttrain.config import TrainStageConfig
from posttrain.data.domains import RECORD_COLUMNS, Record, reply_of
from posttrain.data.formats import Message, decode_messages, trl_row
from posttrain.errors import DataError
from posttrain.layout import Layout
from posttrain.models import chat_template
from posttrain.models.encoding import encode, strip_bos
from posttrain.scoring.generation import assistant_content, chat_prompt, chat_record

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def read_mixture(layout: Layout, stage: str, columns: Sequence[str]) -> datasets.Dataset:
    """The stage's training mixture with exactly `columns` (DataError naming a missing column)."""
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


def check_completion_room(
    prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int, stage: str, where: str
) -> None:
    """With `on_too_long: truncate`, refuse a max_length that cuts every completion away.

    TRL truncates prompt + completion to max_length from the right; when every prompt alone fills
    it, no completion token is left to learn from and the trainer fails deep inside (or trains on
    nothing). Checked on the token counts the stage's tokenizer gives.
    """
    if not prompts:
        return
    lengths = [len(ids) for ids in encode(tokenizer, prompts)]
    if all(n >= max_length for n in lengths):
        shortest = min(lengths)
        raise DataError(
            f"{stage}.max_length: got {max_length} with on_too_long: truncate, which leaves no completion token in "
            f"any of the {len(lengths)} examples of {where} (the shortest prompt has {shortest} tokens); "
            f"expected at least {shortest + 2}"
        )


def check_lengths(
    texts: Sequence[str],
    ids: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    on_too_long: Literal["truncate", "refuse"],
    where: str,
) -> int:
    """Count examples longer than `max_length` tokens (BOS and EOS included); with `refuse`, fail on the first.

    TRL truncates silently; a cut example loses its answer or its EOS, so by default we refuse.
    """
    lengths = [len(ids_) + 1 for ids_ in encode(tokenizer, texts)]
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
    """Language-modelling data: the mixture's `text` column, lengths checked (TRL appends EOS).

    A conversational row (its `conversation` set) is modelled as the chat model sees conversations:
    through the tokenizer's chat template (BOS-free, like every string of the pipeline), not as its
    plain `role: content` rendering. Replaying general chat that way keeps the template's format too.
    """
    import datasets

    data = read_mixture(layout, stage, ["id", "text", "conversation"])
    where = str(layout.mixture(stage) / "train.parquet")
    texts = [
        chat_texts(tokenizer, [decode_messages(conversation)], where)[0] if conversation else text
        for text, conversation in zip(data["text"], data["conversation"], strict=True)
    ]
    check_lengths(texts, data["id"], tokenizer, section.max_length, section.on_too_long, where)
    return datasets.Dataset.from_dict({"text": texts})


def load_prompt_completion_mixture(
    layout: Layout, stage: str, tokenizer: PreTrainedTokenizerBase, section: TrainStageConfig
) -> datasets.Dataset:
    """Prompt-completion data (`prompt`, `completion`), lengths of prompt + completion + EOS checked."""
    data = read_mixture(layout, stage, ["id", "prompt", "completion"])
    where = str(layout.mixture(stage) / "train.parquet")
    texts = [p + c for p, c in zip(data["prompt"], data["completion"], strict=False)]
    check_lengths(texts, data["id"], tokenizer, section.max_length, section.on_too_long, where)
    if section.on_too_long == "truncate":
        check_completion_room(data["prompt"], tokenizer, section.max_length, stage, where)
    return data.select_columns(["prompt", "completion"])


def is_conversational_mixture(layout: Layout, stage: str) -> bool:
    """Whether the mix stage wrote `stage`'s mixture as conversations (manifest `conversational`)."""
    path = mixture_manifest(layout, stage)
    if not path.is_file():
        raise DataError(f"{path}: mixture manifest not found; run the mix stage first (python -m stages.mix)")
    return bool(json.loads(path.read_text()).get("conversational"))


def chat_texts(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[list[Message]], where: str) -> list[str]:
    """Whole conversations rendered by the tokenizer's chat template (what training sees; for length checks),
    BOS-free like every string of the pipeline (`encode` counts the BOS once)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: a conversational mixture needs a chat template, but the model's tokenizer has none; "
            "expected model.chat_template to be set ('base', 'chatml' or a Jinja file)"
        )
    return [strip_bos(tokenizer, tokenizer.apply_chat_template(c, tokenize=False)) for c in conversations]


def load_sft_mixture(
    layout: Layout, stage: str, tokenizer: PreTrainedTokenizerBase, section: TrainStageConfig
) -> tuple[datasets.Dataset, dict[str, bool]]:
    """The SFT mixture as TRL wants it, and the loss mask that fits it (SFTConfig fields).

    - `conversational` (`messages`): TRL applies the chat template; loss on assistant turns only
      (`assistant_only_loss`, which needs generation markers in the template);
    - conversational prompt-completion (message lists in `prompt`/`completion`): TRL applies the
      template; loss on the completion turns only;
    - plain prompt-completion: loss on the completion (+ EOS TRL appends) only.
    """
    import datasets

    if not is_conversational_mixture(layout, stage):
        return load_prompt_completion_mixture(layout, stage, tokenizer, section), {"completion_only_loss": True}
    where = str(layout.mixture(stage) / "train.parquet")
    if "messages" in io.read_parquet(layout.mixture(stage) / "train.parquet")[0]:
        data = read_mixture(layout, stage, ["id", "messages"])
        rows = [trl_row({"messages": m}, True) for m in data["messages"]]
        conversations = [r["messages"] for r in rows]
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        if template and not chat_template.has_generation_markers(template):
            raise DataError(
                f"{where}: SFT on conversations puts loss on assistant turns only, which needs a chat template "
                "with {% generation %} markers; the model's template has none; expected model.chat_template: chatml "
                "or a Jinja file with generation markers"
            )
        fields = {"assistant_only_loss": True, "completion_only_loss": False}
    else:
        data = read_mixture(layout, stage, ["id", "prompt", "completion"])
        rows = [
            trl_row({"prompt": p, "completion": c}, True)
            for p, c in zip(data["prompt"], data["completion"], strict=True)
        ]
        conversations = [r["prompt"] + r["completion"] for r in rows]
        fields = {"completion_only_loss": True}
    check_lengths(chat_texts(tokenizer, conversations, where), data["id"], tokenizer, section.max_length,
                  section.on_too_long, where)  # fmt: skip
    return datasets.Dataset.from_list(rows), fields


def mixture_manifest(layout: Layout, stage: str) -> Path:
    return layout.mixture(stage) / "manifest.json"


@dataclass
class ValidationSet:
    """First `eval_items` validation items of one domain: `text` for loss, `prompt`/`answer` for exact match,
    `replies` (the demonstrated assistant turn: a worked solution, or the answer) for the generation budget."""

    domain: str
    texts: list[str]
    prompts: list[str]
    answers: list[str]
    replies: list[str] = field(default_factory=list)
    verifiers: list[str] = field(default_factory=list)  # each item's verifier name (default: exact)


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


def chat_mixture_row(tokenizer: PreTrainedTokenizerBase, row: dict[str, str], where: str) -> dict[str, str]:
    """A conversational DPO/GRPO mixture row as the pipeline's string pairs: `prompt` = its prompt turns
    through the chat template (generation prompt on), `chosen`/`rejected` = the content of their one
    assistant turn (TRL appends EOS, the template's end-of-turn token). One string form lets the
    pipeline's own measures (margins, held-out rewards) and TRL score exactly the same tokens."""
    out = {**row, "prompt": chat_prompt(tokenizer, decode_messages(row["prompt"]))}
    for side in ("chosen", "rejected"):
        if row.get(side):
            out[side] = assistant_content(row[side], row.get("id"), side, where)
    return out


def load_mixture_rows(
    layout: Layout, stage: str, columns: Sequence[str], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[dict[str, str]], str]:
    """A DPO/GRPO mixture's rows as the pipeline's strings (conversations through the chat template,
    `chat_mixture_row`), and the file they came from (for error messages)."""
    rows = read_mixture(layout, stage, columns).to_list()
    where = str(layout.mixture(stage) / "train.parquet")
    if is_conversational_mixture(layout, stage):
        rows = [chat_mixture_row(tokenizer, row, where) for row in rows]
    return rows, where


PROMPT_ANSWER_COLUMNS = ("id", "domain", "prompt", "answer", "verifier")


def load_prompt_answer_rows(
    layout: Layout, stage: str, tokenizer: PreTrainedTokenizerBase, section: TrainStageConfig
) -> list[dict[str, str]]:
    """GRPO's prompts with their gold `answer` (chat prompts through the template), lengths checked."""
    rows, where = load_mixture_rows(layout, stage, PROMPT_ANSWER_COLUMNS, tokenizer)
    texts, ids = [r["prompt"] + r["answer"] for r in rows], [r["id"] for r in rows]
    check_lengths(texts, ids, tokenizer, section.max_length, section.on_too_long, where)
    return rows


def mixture_domains(weights: dict[str, float]) -> list[str]:
    """The domains a stage's mixture draws from (weight above 0), in the order params.yaml lists them."""
    return [domain for domain, weight in weights.items() if weight > 0]


def load_validation_sets(
    layout: Layout, domains: Sequence[str], eval_items: int, tokenizer: PreTrainedTokenizerBase
) -> dict[str, ValidationSet]:
    """Per-domain validation sets (conversational items through the chat template, `chat_record`);
    a domain without a val split is skipped with a warning."""
    sets: dict[str, ValidationSet] = {}
    for domain in domains:
        path = layout.prepared_split(domain, "val")
        if not path.is_file():
            log.warning("continual evaluation: %s not found, domain %s skipped", path, domain)
            continue
        rows = [
            {k: value or "" for k, value in chat_record(tokenizer, row).items()}
            for row in first_validation_items(layout, [domain], eval_items)
        ]
        if not rows:
            continue
        verifiable = [row for row in rows if row["prompt"] != "" and row["answer"] != ""]
        sets[domain] = ValidationSet(
            domain=domain,
            texts=[row["text"] for row in rows],
            prompts=[row["prompt"] for row in verifiable],
            answers=[row["answer"] for row in verifiable],
            replies=[reply_of(row) for row in verifiable],
            verifiers=[row.get("verifier") or "exact" for row in verifiable],
        )
    return sets
