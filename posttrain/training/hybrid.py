"""Hybrid SFT <-> RL in one GRPO stage (HPT / SASR-style), as a subclass of TRL's GRPOTrainer.

Per prompt, after its `num_generations` rollouts are scored: when the share of rollouts that are
exactly right is above `grpo.hybrid.threshold`, the prompt's rollouts train with the GRPO loss as
usual; otherwise the prompt is one the policy cannot solve yet, its rollouts' advantages are zeroed
and the loss gets an SFT term instead: the token NLL of the item's demonstration (prompt + gold
`answer` + EOS, loss on the answer and EOS only), weighted by `sft_weight`. The share of prompts on
each branch is logged per step (`hybrid/sft_share` in the Trainer's logs; `hybrid_trajectory` and
`hybrid_sft_share_mean` in the stage's metrics).

The demonstration tensors ride along in the generation batch (one row per rollout, like every other
tensor there), so TRL's own shuffling and splitting of the batch keep them aligned.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from posttrain.config import HybridConfig
from posttrain.data.verifiers import exact_match
from posttrain.models.encoding import encode
from posttrain.training.checkpoints import training_series
from posttrain.training.job import MeasureHook, TrainedRun

SFT_KEYS = ("sft_input_ids", "sft_attention_mask", "sft_loss_mask", "sft_rows")


def sft_rows(correct: Sequence[bool], group: int, threshold: float) -> list[bool]:
    """Per rollout: True (SFT branch) when its prompt's rollout accuracy is at most `threshold`."""
    out: list[bool] = []
    for start in range(0, len(correct), group):
        accuracy = statistics.fmean(correct[start : start + group])
        out += [accuracy <= threshold] * len(correct[start : start + group])
    return out


def demonstrations(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Right-padded token ids of prompt + answer + EOS (the BOS once where the tokenizer adds one, as GRPO's
    own prompts get it), with a loss mask on the answer and EOS."""
    rows, masks = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids, full_ids = encode(tokenizer, [prompt, prompt + answer])
        ids = full_ids + [tokenizer.eos_token_id]
        rows.append(ids)
        masks.append([0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids)))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "sft_input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "sft_attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "sft_loss_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32),
    }


def demonstration_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: mean next-token NLL over the loss-masked tokens (answer + EOS)."""
    logits = model(input_ids=batch["sft_input_ids"], attention_mask=batch["sft_attention_mask"]).logits[:, :-1]
    targets = batch["sft_input_ids"][:, 1:]
    mask = batch["sft_loss_mask"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def hybrid_trainer(base: type) -> type:
    """A subclass of GRPOTrainer `base` with the per-prompt SFT/RL rule; construct it with `hybrid=`."""

    class HybridTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, hybrid: HybridConfig, **kwargs: Any) -> None:
            self.hybrid = hybrid
            super().__init__(*args, **kwargs)

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            output = super()._generate_and_score_completions(inputs)
            if not self.model.training:
                return output
            texts = self.processing_class.batch_decode(output["completion_ids"], skip_special_tokens=True)
            correct = [exact_match(text, row["answer"]) for text, row in zip(texts, inputs, strict=True)]
            rows = sft_rows(correct, self.num_generations, self.hybrid.threshold)
            flags = torch.tensor(rows, dtype=torch.float32, device=output["advantages"].device)
            # SFT prompts leave the policy-gradient term: their rollouts get no advantage.
            output["advantages"] = output["advantages"] * (1.0 - flags)
            demos = demonstrations(self.processing_class, [r["prompt"] for r in inputs], [r["answer"] for r in inputs])
            output |= {k: v.to(output["advantages"].device) for k, v in demos.items()} | {"sft_rows": flags}
            share = statistics.fmean(rows)
            self._metrics["train"]["hybrid/sft_share"].append(share)
            self._metrics["train"]["hybrid/rl_share"].append(1.0 - share)
            return output

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> torch.Tensor:
            inputs = dict(inputs)  # a copy: TRL reuses the buffered batch when num_iterations > 1
            sft = {k: inputs.pop(k) for k in SFT_KEYS if k in inputs}
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if sft and sft["sft_rows"].any():
                # Rows of the SFT branch, averaged over all rows: each branch weighs by its share of the batch.
                per_row = demonstration_nll(model, sft)
                loss = loss + self.hybrid.sft_weight * (per_row * sft["sft_rows"]).sum() / len(per_row)
            return loss

    HybridTrainer.__name__ = HybridTrainer.__qualname__ = f"Hybrid{base.__name__}"
    return HybridTrainer


def hybrid_hook() -> MeasureHook:
    """After training: the SFT / RL shares per logging step (metrics `hybrid_trajectory`, an MLflow series)."""

    def measure(run: TrainedRun) -> dict[str, Any]:
        series = training_series(run.final_checkpoint, ("hybrid/sft_share", "hybrid/rl_share"))
        rows = [{"step": e["step"], "sft_share": e["hybrid/sft_share"]} for e in series if "hybrid/sft_share" in e]
        shares = [r["sft_share"] for r in rows]
        return {"hybrid_trajectory": rows, "hybrid_sft_share_mean": statistics.fmean(shares) if shares else None}

    return measure
