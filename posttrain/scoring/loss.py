"""Token loss: the one definition of "loss on a text" used by training-time evaluation and the evaluate stage.

Convention: the text is tokenized as training saw it, the tokenizer's BOS once where it adds one
(posttrain.models.encoding.encode), and the tokenizer's EOS id is appended (as TRL's trainers end
every training example), right padded so positions are those seen in training; the loss is the
summed next-token NLL over the real tokens (the BOS is context, never predicted).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.models.encoding import encode


def token_losses(model: Any, tokenizer: Any, texts: list[str], batch_size: int) -> tuple[list[float], list[int]]:
    """Per text: summed next-token NLL over `text` + EOS (after the BOS, where the tokenizer adds one), and
    the number of predicted tokens.

    Leaves the model in the mode it found it.
    """
    tok = tokenizer
    eos = tok.eos_token_id
    rows = [ids + ([eos] if eos is not None else []) for ids in encode(tok, texts)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
    device = next(model.parameters()).device
    sums: list[float] = [0.0] * len(rows)
    counts: list[int] = [0] * len(rows)
    was_training = model.training
    model.eval()
    try:
        # no_grad, not inference_mode: continual evaluation runs this mid-training, and tensors made under
        # inference_mode must never reach autograd afterwards.
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                width = max(len(r) for r in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, r in enumerate(chunk):
                    ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                    mask[i, : len(r)] = 1
                ids, mask = ids.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none"
                )
                for i in range(len(chunk)):
                    sums[start + i] = float(nll[i].sum())
                    counts[start + i] = int((labels[i] != -100).sum())
    finally:
        model.train(was_training)
    return sums, counts


def mean_token_loss(model: Any, tokenizer: Any, texts: list[str], batch_size: int) -> float:
    """Loss per token over all `texts` (token-weighted, as the evaluate stage's loss)."""
    sums, counts = token_losses(model, tokenizer, texts, batch_size)
    return sum(sums) / max(1, sum(counts))
