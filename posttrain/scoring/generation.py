"""Batched text generation shared by evaluation and the training stages' continual evaluation.

Prompts are text: plain items as they are, conversational items rendered by `chat_record` through
the tokenizer's chat template with the generation prompt. The model generates until it emits
the tokenizer's EOS token (a built-in template's end-of-turn token) or `max_new_tokens` run out. Prompts are left-padded so every row's next
token sits in the last column, which is what makes batched greedy decoding equal one-by-one greedy
decoding (position ids come from the attention mask inside `generate`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from posttrain.data.formats import Message, decode_messages, full_conversation, prompt_turns
from posttrain.errors import DataError, StageError
from posttrain.models.encoding import encode, strip_bos

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
) -> list[list[str]]:
    """Generate completions for `prompts`; returns, per prompt, `num_return_sequences` strings.

    Greedy when `do_sample` is False; plain temperature sampling (no top-k/top-p truncation, so
    pass@k measures the model's own distribution) when True. With `seed` set, sampling is
    deterministic and the global RNG state is left untouched. Completions have EOS and padding
    stripped and are decoded without special tokens.
    """
    # lazy: torch, transformers are heavy to import; only this path needs them
    import torch
    from transformers import GenerationConfig

    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_return_sequences <= 0:
        raise ValueError(f"num_return_sequences must be positive, got {num_return_sequences}")
    if not prompts:
        return []

    pad_id = _pad_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        num_return_sequences=num_return_sequences,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        # Explicit, so a model's saved generation_config (top_k=50, max_length, ...) cannot change
        # what is measured.
        **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}),
    )

    encoded = encode_prompts(tokenizer, prompts)
    # Sort by length so each batch needs little padding; results are put back in prompt order.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[str]] = [[] for _ in prompts]

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        # fork_rng: seeding here must not change the caller's (e.g. a Trainer's) random stream.
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    ids = encoded[i]
                    if ids:
                        input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                        attention_mask[r, width - len(ids) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                )
                new_tokens = output[:, width:].tolist()
                for j, ids in enumerate(new_tokens):
                    # Rows of one prompt are consecutive (generate repeats each prompt in place).
                    prompt_index = rows[j // num_return_sequences]
                    # Rows that finished early are filled with pad after their EOS: cutting at the
                    # first EOS removes both.
                    if eos_id is not None and eos_id in ids:
                        ids = ids[: ids.index(eos_id)]
                    results[prompt_index].append(tokenizer.decode(ids, skip_special_tokens=True))
    finally:
        if was_training:
            model.train()
    return results


def answer_budget(tokenizer: Any, answers: list[str]) -> int:
    """New tokens enough for the longest answer plus EOS (a sample longer than that is wrong anyway)."""
    return max(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]) + 1
