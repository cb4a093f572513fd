"""Stage `grpo`: group relative policy optimisation of the dpo model with verifiable rewards.

TRL's GRPOTrainer samples `num_generations` completions per prompt of the `grpo` mixture
(`prompt`, `answer`, ...), scores them with the reward functions named in `grpo.rewards`
(posttrain.rewards, combined with their weights) and pushes up the completions that beat their
group's mean. A group whose completions all score the same gives no signal: that is why the
default recipe trains on harder items (`add3`) with partial credit (`digit_match`).

Measured on held-out prompts (the first `eval_items` val items of each GRPO domain), for the input
and the output model: the mean combined reward of the greedy completion and of `eval_samples`
sampled ones, greedy exact match, and the share of sampled groups with zero reward variance.
From TRL's log: the training reward curve and `frac_reward_zero_std`.

    reads   artifacts/models/dpo/, artifacts/data/mixtures/grpo/, artifacts/data/prepared/*/val
    writes  artifacts/models/grpo/ (+ lineage.json), artifacts/metrics/grpo.json,
            artifacts/plots/grpo_rewards.json
"""

from __future__ import annotations

import json
import logging
import statistics
from typing import Any

from posttrain import adapters, rewards, training
from posttrain.config import GRPOStageConfig, Params
from posttrain.data import io
from posttrain.data.domains import RECORD_COLUMNS
from posttrain.entry import StageResult, stage_main
from posttrain.layout import Layout
from posttrain.lineage import write_json_atomic

STAGE = "grpo"
PARENT = "dpo"
COLUMNS = ("id", "domain", "prompt", "answer", "verifier")
TRL_SERIES = ("loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "kl")
# Sampled completions per held-out prompt when scoring a model (the rewards' spread shows in these).
EVAL_SAMPLES = 4

log = logging.getLogger("posttrain.grpo")


def score_model(
    model: Any,
    tokenizer: Any,
    section: GRPOStageConfig,
    prompts: list[str],
    answers: list[str],
    seed: int,
) -> dict[str, float]:
    """Mean combined reward of greedy and sampled completions, greedy exact match, zero-variance share."""
    from posttrain.generation import generate

    budget = section.max_completion_length
    greedy = [c[0] for c in generate(model, tokenizer, prompts, max_new_tokens=budget)]
    sampled = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=budget,
        do_sample=True,
        temperature=section.temperature,
        num_return_sequences=EVAL_SAMPLES,
        seed=seed,
    )
    flat = [c for group in sampled for c in group]
    flat_answers = [a for a in answers for _ in range(EVAL_SAMPLES)]
    sampled_rewards = rewards.combined_reward(section.rewards, flat, flat_answers)
    groups = [sampled_rewards[i : i + EVAL_SAMPLES] for i in range(0, len(flat), EVAL_SAMPLES)]
    return {
        "greedy_reward": statistics.fmean(rewards.combined_reward(section.rewards, greedy, answers)),
        "sampled_reward": statistics.fmean(sampled_rewards),
        "greedy_exact_match": statistics.fmean(rewards.exact_match(greedy, answers)),
        "sampled_zero_variance_groups": statistics.fmean(max(g) == min(g) for g in groups),
    }


def training_series(layout: Layout, metrics: dict[str, Any], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """TRL's logged values per logging step (per-reward means included), from the final checkpoint's
    trainer_state.json: the Trainer saves at the last step, and a resumed run keeps its history."""
    state_file = layout.root / metrics["checkpoints"] / f"checkpoint-{metrics['steps']}" / "trainer_state.json"
    if not state_file.is_file():
        return []
    history = json.loads(state_file.read_text()).get("log_history", [])
    return [
        {"step": e["step"], **{k: e[k] for k in e if k in keys or k.startswith("rewards/")}}
        for e in history
        if any(k in e for k in keys)
    ]


def run(params: Params, layout: Layout) -> StageResult:
    section = params.grpo
    runtime = training.setup_runtime(params.compute, params.seed)
    domains = [d for d, w in params.mixtures[STAGE].weights.items() if w > 0]
    # Unknown names were refused at validation; this builds the guarded callables (errors name the function).
    reward_funcs, reward_weights = rewards.build_rewards(section.rewards)

    # 1. The dpo model, its files checked against their lineage hashes.
    parent = layout.model(PARENT)
    # With `grpo.lora`: a LoRA adapter on it, or the adapter passed on by dpo (posttrain.adapters).
    loaded = adapters.load_input_model(layout, STAGE, parent, params, runtime)
    model, tokenizer = loaded.model, loaded.tokenizer

    # 2. Prompts with their gold `answer` (TRL hands every column but `prompt` to the reward functions).
    data = training.read_mixture(layout, STAGE, COLUMNS)
    where = str(layout.mixture(STAGE) / "train.parquet")
    texts = [p + a for p, a in zip(data["prompt"], data["answer"], strict=True)]
    training.check_lengths(texts, data["id"], tokenizer, section.max_length, section.on_too_long, where)

    # 3. The input model's reward on held-out prompts.
    held_out = []
    for domain in domains:
        held_out += io.read_parquet(layout.prepared_split(domain, "val"), RECORD_COLUMNS)[: section.eval_items]
    prompts, answers = [r["prompt"] for r in held_out], [r["answer"] for r in held_out]
    before = score_model(model, tokenizer, section, prompts, answers, params.seed)
    log.info("grpo: input model on %d held-out prompts: %s", len(prompts), before)

    # 4. GRPO through the shared trainer set-up.
    from trl import GRPOConfig, GRPOTrainer

    job = training.TrainingJob(
        stage=STAGE,
        section=section,
        model=model,
        tokenizer=tokenizer,
        train_dataset=data,
        data_manifest=training.mixture_manifest(layout, STAGE),
        parents=[parent],
        config_cls=GRPOConfig,
        trainer_cls=GRPOTrainer,
        config_fields={
            "num_generations": section.num_generations,
            "max_completion_length": section.max_completion_length,
            "temperature": section.temperature,
            "beta": section.beta,
            "reward_weights": reward_weights,
        },
        trainer_kwargs={"reward_funcs": reward_funcs},
        adapter=loaded.adapter,
        metrics_extra={"grpo_domains": domains, "rewards": [s.model_dump() for s in section.rewards]},
    )
    result = training.run_training(job, params, layout, runtime)
    if result.model_dir is None:  # a non-main rank under accelerate: rank 0 writes the metrics
        return result

    # 5. The trained model on the same held-out prompts, and TRL's reward curve.
    after = score_model(job.model, tokenizer, section, prompts, answers, params.seed)
    log.info("grpo: output model on %d held-out prompts: %s", len(prompts), after)
    metrics_path = layout.metrics(STAGE)
    metrics = json.loads(metrics_path.read_text())
    series = training_series(layout, metrics, TRL_SERIES)
    curve_path = layout.plots / f"{STAGE}_rewards.json"
    write_json_atomic(curve_path, series)
    result.artifacts.append(curve_path)
    zero_std = [e["frac_reward_zero_std"] for e in series if "frac_reward_zero_std" in e]
    extra: dict[str, Any] = {
        "held_out_prompts": len(prompts),
        **{f"{k}_before": v for k, v in before.items()},
        **{f"{k}_after": v for k, v in after.items()},
        "train_reward_first": next((e["reward"] for e in series if "reward" in e), None),
        "train_reward_last": next((e["reward"] for e in reversed(series) if "reward" in e), None),
        "train_frac_reward_zero_std_mean": statistics.fmean(zero_std) if zero_std else None,
        "reward_curve": series,
    }
    # run_training has already written the model and the metrics; measurements taken after it are merged in.
    write_json_atomic(metrics_path, {**metrics, **extra})
    result.metrics.update({k: v for k, v in extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return result


if __name__ == "__main__":
    stage_main(STAGE, run)
