"""What the DPO and GRPO stages measure on held-out data, before and after training.

Each `*_hook` measures the input model when it is built (the "before" side, on the model the stage
loaded) and returns a `TrainingJob.measure` hook that measures the trained model on the same items
(the "after" side) and reads TRL's logged series from the final checkpoint. `run_training` merges
what the hook returns into metrics.json before its single write.

    DPO    log-probability margin log p(chosen) - log p(rejected) on held-out offline pairs, the implicit
           reward margin beta * (after - before), preference accuracy, TRL's rewards/margins curve
    GRPO   mean combined reward of greedy and sampled completions, greedy exact match, share of sampled
           groups (of num_generations) with zero reward variance; TRL's reward curve (also for `dvc plots`)
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import Any

from posttrain.config import EngineConfig, GRPOStageConfig
from posttrain.data.verifiers import VERIFIERS
from posttrain.io import write_json_atomic
from posttrain.layout import Layout
from posttrain.scoring import rewards
from posttrain.scoring.generation import generate
from posttrain.scoring.preference import preference_accuracy, preference_margins
from posttrain.training.checkpoints import training_series
from posttrain.training.job import MeasureHook, TrainedRun

log = logging.getLogger(__name__)

DPO_SERIES = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
GRPO_SERIES = ("loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "kl")


def dpo_hook(
    model: Any, tokenizer: Any, held_out: list[dict[str, str]], beta: float, domains: list[str]
) -> MeasureHook:
    """Held-out preference margins of `model` now; the hook measures the trained model on the same pairs."""
    margins_before = preference_margins(model, tokenizer, held_out)

    def measure(run: TrainedRun) -> dict[str, Any]:
        margins_after = preference_margins(run.model, run.tokenizer, held_out)
        before, after = statistics.fmean(margins_before), statistics.fmean(margins_after)
        series = training_series(run.final_checkpoint, DPO_SERIES)
        trl_margins = [e["rewards/margins"] for e in series if "rewards/margins" in e]
        log.info("dpo: held-out log-prob margin %.3f -> %.3f", before, after)
        return {
            "held_out_pairs": len(held_out),
            "logp_margin_before": before,
            "logp_margin_after": after,
            # beta * (policy log-ratio margin - reference log-ratio margin); 0 before training by definition.
            "reward_margin_after": beta * (after - before),
            "preference_accuracy_before": preference_accuracy(margins_before),
            "preference_accuracy_after": preference_accuracy(margins_after),
            "train_reward_margin_first": trl_margins[0] if trl_margins else None,
            "train_reward_margin_last": trl_margins[-1] if trl_margins else None,
            "train_series": series,
            "exact_match_before": {d: run.metrics["val_before"].get(d, {}).get("exact_match") for d in domains},
            "exact_match_after": {d: run.metrics["val_after"].get(d, {}).get("exact_match") for d in domains},
        }

    return measure


def score_policy(
    model: Any,
    tokenizer: Any,
    section: GRPOStageConfig,
    prompts: list[str],
    answers: list[str],
    seed: int,
    verifiers: list[str] | None = None,
    engine: str = "hf",
    options: EngineConfig | None = None,
) -> dict[str, float]:
    """Mean combined reward of greedy and sampled completions, greedy exact match, and the share of prompts
    whose `num_generations` sampled completions (a training group's size) all get the same reward."""
    budget, samples = section.max_completion_length, section.num_generations
    through = {"engine": engine, "options": options}
    greedy = [c[0] for c in generate(model, tokenizer, prompts, max_new_tokens=budget, **through)]
    sampled = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=budget,
        do_sample=True,
        temperature=section.temperature,
        num_return_sequences=samples,
        seed=seed,
        **through,
    )
    flat = [c for group in sampled for c in group]
    flat_answers = [a for a in answers for _ in range(samples)]
    sampled_rewards = rewards.combined_reward(section.rewards, flat, flat_answers)
    groups = [sampled_rewards[i : i + samples] for i in range(0, len(flat), samples)]
    return {
        "greedy_reward": statistics.fmean(rewards.combined_reward(section.rewards, greedy, answers)),
        "sampled_reward": statistics.fmean(sampled_rewards),
        # Each item's own verifier (exact, numeric, math), as in the evaluate stage.
        "greedy_exact_match": statistics.fmean(
            VERIFIERS[v](c, a) for v, c, a in zip(verifiers or ["exact"] * len(answers), greedy, answers, strict=True)
        ),
        "sampled_zero_variance_groups": statistics.fmean(max(g) == min(g) for g in groups),
    }


def grpo_before(
    model: Any,
    tokenizer: Any,
    section: GRPOStageConfig,
    held_out: Sequence[dict[str, str]],
    seed: int,
    stage: str,
    engine: str = "hf",
    options: EngineConfig | None = None,
) -> dict[str, float]:
    """`score_policy` of the input model on the held-out prompts (GRPO's "before")."""
    prompts, answers = [r["prompt"] for r in held_out], [r["answer"] for r in held_out]
    verifiers = [r["verifier"] for r in held_out]
    before = score_policy(model, tokenizer, section, prompts, answers, seed, verifiers, engine, options)
    log.info("%s: input model on %d held-out prompts: %s", stage, len(prompts), before)
    return before


def grpo_hook(
    section: GRPOStageConfig,
    held_out: Sequence[dict[str, str]],
    before: dict[str, float],
    seed: int,
    layout: Layout,
    stage: str,
    engine: str = "hf",
    options: EngineConfig | None = None,
) -> MeasureHook:
    """A hook that scores the trained model on the held-out prompts `before` (grpo_before) was measured on."""
    prompts, answers = [r["prompt"] for r in held_out], [r["answer"] for r in held_out]
    verifiers = [r["verifier"] for r in held_out]

    def measure(run: TrainedRun) -> dict[str, Any]:
        after = score_policy(run.model, run.tokenizer, section, prompts, answers, seed, verifiers, engine, options)
        log.info("%s: output model on %d held-out prompts: %s", stage, len(prompts), after)
        series = training_series(run.final_checkpoint, GRPO_SERIES, prefixes=("rewards/",))
        curve_path = layout.plots / f"{stage}_rewards.json"
        write_json_atomic(curve_path, series)
        run.artifacts.append(curve_path)
        zero_std = [e["frac_reward_zero_std"] for e in series if "frac_reward_zero_std" in e]
        return {
            "held_out_prompts": len(prompts),
            **{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items()},
            "train_reward_first": next((e["reward"] for e in series if "reward" in e), None),
            "train_reward_last": next((e["reward"] for e in reversed(series) if "reward" in e), None),
            "train_frac_reward_zero_std_mean": statistics.fmean(zero_std) if zero_std else None,
            "reward_curve": series,
        }

    return measure
