"""Hybrid SFT <-> RL: the per-prompt branch rule and the demonstration loss."""

from __future__ import annotations

import torch
from helpers.tiny import char_tokenizer, tiny_model

from posttrain.training.hybrid import demonstration_nll, demonstrations, sft_rows


def test_sft_branch_for_failed_rollouts_rl_branch_above_the_threshold() -> None:
    # Prompt 1: all 4 rollouts fail -> SFT. Prompt 2: 2 of 4 right (0.5 > 0.25) -> RL.
    # Prompt 3: 1 of 4 right (0.25, not above 0.25) -> SFT.
    correct = [False] * 4 + [True, False, True, False] + [True, False, False, False]
    assert sft_rows(correct, 4, 0.25) == [True] * 4 + [False] * 4 + [True] * 4
    # Threshold 0: only prompts whose rollouts all fail go to SFT.
    assert sft_rows(correct, 4, 0.0) == [True] * 4 + [False] * 8


def test_demonstration_loss_covers_the_answer_and_eos_only() -> None:
    tokenizer = char_tokenizer()
    batch = demonstrations(tokenizer, ["12+3=", "1+1="], ["15", "2"])
    assert batch["sft_input_ids"].shape == (2, 8)
    assert batch["sft_loss_mask"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert batch["sft_loss_mask"][1].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert batch["sft_input_ids"][1, 5].item() == tokenizer.eos_token_id
    model, _ = tiny_model(tokenizer)
    nll = demonstration_nll(model, batch)
    assert nll.shape == (2,) and torch.isfinite(nll).all() and (nll > 0).all()
    # Training on it lowers it: the term has a gradient through the model.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        demonstration_nll(model, batch).mean().backward()
        optimizer.step()
    assert demonstration_nll(model, batch).mean() < nll.mean() * 0.5
