"""Length checks that need the tokenizer but not a trainer (kept apart from posttrain.training)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain.errors import DataError


def check_completion_room(prompts: Sequence[str], tokenizer: Any, max_length: int, stage: str, where: str) -> None:
    """With `on_too_long: truncate`, refuse a max_length that cuts every completion away.

    TRL truncates prompt + completion to max_length from the right; when every prompt alone fills
    it, no completion token is left to learn from and the trainer fails deep inside (or trains on
    nothing). Checked on the token counts the stage's tokenizer gives.
    """
    if not prompts:
        return
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    if all(n >= max_length for n in lengths):
        shortest = min(lengths)
        raise DataError(
            f"{stage}.max_length: got {max_length} with on_too_long: truncate, which leaves no completion token in "
            f"any of the {len(lengths)} examples of {where} (the shortest prompt has {shortest} tokens); "
            f"expected at least {shortest + 2}"
        )
