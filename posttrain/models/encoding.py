"""Token ids of the pipeline's texts: the tokenizer's BOS exactly once, wherever the tokenizer adds one.

Many model families are trained with a BOS token in front of every sequence and their tokenizers
add it on encode: Llama 2 and Mistral (`<s>`), Llama 3 (`<|begin_of_text|>`), Gemma (`<bos>`).
Without it such a model is a different model: a held-out base (SentencePiece, 262k vocabulary) scored a
general-chat line at loss 5.85 with `<bos>` and 8.09 without (issue 26). GPT-2, Qwen2 and SmolLM2
tokenizers add none, and nothing below changes what they see.

The rule, in one place:

- every string the pipeline holds is BOS-free: plain text as it is, chat prompts and conversations
  rendered by the chat template with a leading BOS dropped (`strip_bos`, called by
  posttrain.scoring.generation's `chat_prompt`/`chat_record` and training.data's `chat_texts`);
- every tokenization of such a string puts the BOS back once (`encode`): generation, token loss,
  DPO margins, length checks, hybrid SFT demonstrations. TRL's DPO and GRPO trainers tokenize string
  prompts with the tokenizer's special tokens on, which adds it the same way, once;
- TRL's SFT tokenizes conversations itself with `apply_chat_template(tokenize=True)`, which adds no
  special tokens: there the template must render the BOS, and `chat_template.install` makes sure it
  does on a tokenizer that adds one.

lm-evaluation-harness settles BOS by its own rules (posttrain.scoring.lm_eval_tasks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer puts in front of a text on encode; None when it adds none.

    Asked of the tokenizer itself, not of its `bos_token`: SmolLM2's tokenizer names `<|im_start|>`
    as its BOS token but never adds it.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


def strip_bos(tokenizer: Any, text: str) -> str:
    """`text` without a leading BOS token string, where the tokenizer adds one on encode (else unchanged)."""
    token = tokenizer.bos_token
    if token and text.startswith(token) and bos_id(tokenizer) is not None:
        return text[len(token) :]
    return text


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, starting with the tokenizer's BOS exactly once where it adds one.

    No other special tokens: a post-processor that also appends EOS would end every prompt with
    "stop" (the token-loss convention appends the EOS itself).
    """
    bos = bos_id(tokenizer)
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if bos is None:
        return [list(ids) for ids in rows]
    return [list(ids) if list(ids[:1]) == [bos] else [bos, *ids] for ids in rows]
