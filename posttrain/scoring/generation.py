"""Text generation shared by evaluation, the training stages' continual evaluation, on-policy DPO
pairs and GRPO's held-out rewards.

Prompts are text: plain items as they are, conversational items rendered by `chat_record` through
the tokenizer's chat template with the generation prompt. The model generates until it emits
the tokenizer's EOS token (a built-in template's end-of-turn token) or `max_new_tokens` run out.
Which engine generates (plain `generate`, continuous batching, vLLM) is posttrain.scoring.engines;
this module turns text into token ids and back, the same for all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from posttrain.data.formats import Message, decode_messages, full_conversation, prompt_turns
from posttrain.errors import DataError, StageError
from posttrain.models.encoding import encode, strip_bos
from posttrain.scoring.engines import GenerationRequest, GenerationStats, timed_run

if TYPE_CHECKING:
    from posttrain.config import EngineConfig

log = logging.getLogger(__name__)


def _require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise StageError(
            "a conversational item needs a chat template, but the model's tokenizer has none; "
            "expected model.chat_template to be set ('base', 'chatml' or a Jinja file)"
        )


def chat_prompt(tokenizer: Any, turns: list[Message]) -> str:
    """Prompt turns through the tokenizer's chat template, ending with the assistant's generation prompt
    (BOS-free: `encode` puts the tokenizer's BOS back once, posttrain.models.encoding)."""
    _require_template(tokenizer)
    return strip_bos(tokenizer, tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))


def chat_record(tokenizer: Any, record: dict[str, Any]) -> dict[str, Any]:
    """A prepared record as a chat model sees it: a conversational record (non-empty `messages`) gets
    `prompt` = its prompt turns through the chat template with the generation prompt, and `text` =
    the whole conversation through the template (what loss and perplexity score); a plain record is
    returned unchanged."""
    if not record.get("messages"):
        return record
    _require_template(tokenizer)
    text = strip_bos(tokenizer, tokenizer.apply_chat_template(full_conversation(record), tokenize=False))
    return {**record, "prompt": chat_prompt(tokenizer, prompt_turns(record)), "text": text}


def assistant_content(value: str, row_id: str | None, side: str, where: str) -> str:
    """The content of the one assistant turn a stored `chosen`/`rejected` message list holds (DataError else)."""
    turns = decode_messages(value)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise DataError(
            f"{where}: row {row_id!r} field {side!r} has {len(turns)} turn(s) ({[t['role'] for t in turns]}); "
            "expected exactly one assistant turn"
        )
    return turns[0]["content"]


def chat_validation_items(tokenizer: Any, records: Sequence[dict[str, Any]], where: str) -> list[dict[str, str]]:
    """Validation records as the model sees them (`chat_record`); a conversational preference record's
    `chosen`/`rejected` become their assistant turn's content, like `chat_mixture_row`."""
    out = []
    for record in records:
        rendered = chat_record(tokenizer, record)
        if record.get("messages"):
            for side in ("chosen", "rejected"):
                if record.get(side):
                    rendered[side] = assistant_content(record[side], record.get("id"), side, where)
        out.append(rendered)
    return out


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # unreachable; keeps type checkers quiet


def encode_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as the model saw prompts in training: the tokenizer's BOS once where it
    adds one, and no EOS after the prompt (the model must continue it), posttrain.models.encoding."""
    return encode(tokenizer, prompts)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    seed: int | None = None,
    engine: str = "hf",
    options: EngineConfig | None = None,
    stats: GenerationStats | None = None,
) -> list[list[str]]:
    """Generate completions for `prompts`; returns, per prompt, `num_return_sequences` strings.

    Greedy when `do_sample` is False; plain temperature sampling (no top-k/top-p truncation, so
    pass@k measures the model's own distribution) when True. With `seed` set, sampling is
    deterministic and the global RNG state is left untouched. Completions have EOS and padding
    stripped and are decoded without special tokens. `engine` (posttrain.scoring.engines) decides
    what generates; `stats`, when given, accumulates its wall time and generated tokens.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_return_sequences <= 0:
        raise ValueError(f"num_return_sequences must be positive, got {num_return_sequences}")
    if not prompts:
        return []
    eos_id = tokenizer.eos_token_id
    request = GenerationRequest(
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        pad_id=_pad_id(tokenizer),
        do_sample=do_sample,
        temperature=temperature,
        n=num_return_sequences,
        seed=seed,
        batch_size=batch_size,
    )
    sequences = timed_run(engine, model, tokenizer, encode_prompts(tokenizer, prompts), request, options, stats)
    return [
        [tokenizer.decode(ids[:-1] if ids and ids[-1] == eos_id else ids, skip_special_tokens=True) for ids in group]
        for group in sequences
    ]


def answer_budget(tokenizer: Any, answers: list[str]) -> int:
    """New tokens enough for the longest answer plus EOS (a sample longer than that is wrong anyway)."""
    return max(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]) + 1
