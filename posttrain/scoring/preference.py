"""Preference accuracy: is the chosen answer more likely than the rejected one? One definition for DPO's
held-out measures (posttrain.training.measures) and the evaluate stage (`evaluate.preference_domains`).

A pair's margin is log p(chosen + EOS | prompt) - log p(rejected + EOS | prompt), tokenized the way TRL's
DPOTrainer tokenizes its pairs, so that (policy margin - reference margin) * beta is TRL's implicit reward
margin. Preference accuracy is the share of pairs with a positive margin: a tie is not a preference.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from posttrain.data.domains import preference_replies
from posttrain.models.encoding import encode


def preference_accuracy(margins: Sequence[float]) -> float:
    """Share of pairs whose chosen answer is strictly more likely than the rejected one."""
    if not margins:
        raise ValueError("preference accuracy of no pairs; expected at least one margin")
    return sum(1 for m in margins if m > 0) / len(margins)


def completion_logps(
    model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 64
) -> list[float]:
    """Sum of log p(completion + EOS | prompt) per pair, tokenized the way TRL's DPOTrainer does.

    DPOTrainer appends the EOS token to the completion text, tokenizes with the tokenizer's special
    tokens (the BOS once on the pipeline's BOS-free strings, `encode`) and takes the completion to
    start where the tokenized prompt and prompt+completion diverge; doing the same here makes these
    numbers the policy side of TRL's implicit reward.
    """
    import torch

    eos = tokenizer.eos_token
    sequences: list[tuple[list[int], int]] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids, full_ids = encode(tokenizer, [prompt, prompt + completion + eos])
        start = 0
        while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
            start += 1
        sequences.append((full_ids, start))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for begin in range(0, len(sequences), batch_size):
                chunk = sequences[begin : begin + batch_size]
                width = max(len(ids) for ids, _ in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                scored = torch.zeros((len(chunk), width), dtype=torch.bool)
                for row, (ids, start) in enumerate(chunk):  # right padding: positions as in training
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    mask[row, : len(ids)] = 1
                    scored[row, max(start, 1) : len(ids)] = True
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
                logps = torch.log_softmax(logits[:, :-1], dim=-1)
                token_logps = logps.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
                out.extend((token_logps * scored[:, 1:].to(device)).sum(dim=1).tolist())
    finally:
        model.train(was_training)
    return out


def preference_margins(model: Any, tokenizer: Any, pairs: Sequence[dict[str, str]]) -> list[float]:
    """log p(chosen) - log p(rejected) under `model`, per pair (positive: the model prefers chosen)."""
    prompts = [p["prompt"] for p in pairs]
    chosen = completion_logps(model, tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected = completion_logps(model, tokenizer, prompts, [p["rejected"] for p in pairs])
    return [c - r for c, r in zip(chosen, rejected, strict=True)]


def offline_pairs(records: Sequence[dict[str, str]], seed: int) -> list[dict[str, str]]:
    """Offline pairs for held-out records: a user's own pair where the record has one, else the data layer's
    `preference_replies` (the demonstrated reply against the same reply ending in a plausible wrong answer)."""
    rng = random.Random(seed)
    pairs = []
    for r in records:
        chosen, rejected = (r["chosen"], r["rejected"]) if r.get("chosen") else preference_replies(r, rng)
        pairs.append({**{c: r[c] for c in ("id", "domain", "prompt", "answer", "verifier")}, "chosen": chosen,
                      "rejected": rejected})  # fmt: skip
    return pairs
