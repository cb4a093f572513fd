"""Stage `dpo`: direct preference optimisation of the sft model.

TRL's DPOTrainer with an explicit frozen reference: a second, hash-checked copy of the input (sft)
model. Pairs come from the `dpo` mixture (`pairs: offline`: chosen = the verified answer,
rejected = the data layer's plausible wrong answer) or are built from the input model's own
samples (`pairs: on_policy`, see posttrain.preferences; prompts where all samples agree keep the
offline pair, and both kinds are counted in the metrics).

Measured, on held-out offline pairs from each DPO domain's val split (the same pairs before and
after): the log-probability margin log p(chosen) - log p(rejected) of the input and the output
model, and the implicit DPO reward margin beta * (margin_after - margin_before), which is what
TRL's `rewards/margins` measures on training batches. Exact match per domain before/after comes
from the shared continual evaluation (`val_before` / `val_after`); DPO must not lower it.

    reads   artifacts/models/sft/, artifacts/data/mixtures/dpo/, artifacts/data/prepared/*/val
    writes  artifacts/models/dpo/ (+ lineage.json), artifacts/metrics/dpo.json
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from typing import Any

from posttrain import adapters, modeling, preferences, training
from posttrain.config import Params
from posttrain.data import io
from posttrain.data.domains import RECORD_COLUMNS
from posttrain.entry import StageResult, stage_main
from posttrain.layout import Layout
from posttrain.lineage import write_json_atomic

STAGE = "dpo"
PARENT = "sft"
TRL_SERIES = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")

log = logging.getLogger("posttrain.dpo")


def held_out_pairs(layout: Layout, domains: list[str], items: int, seed: int) -> list[dict[str, str]]:
    """Offline pairs on the first `items` val records of each domain (never trained on)."""
    records = []
    for domain in domains:
        records += io.read_parquet(layout.prepared_split(domain, "val"), RECORD_COLUMNS)[:items]
    return preferences.offline_pairs(records, seed)


def answer_budget(tokenizer: Any, answers: list[str]) -> int:
    """New tokens enough for the longest answer plus EOS (samples longer than that are wrong anyway)."""
    return max(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]) + 1


def training_series(layout: Layout, metrics: dict[str, Any], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """TRL's logged values per logging step, read from the final checkpoint's trainer_state.json.

    The Trainer always saves a checkpoint at the last step, and a resumed run's state carries the
    history from before the interruption, so this is the whole run's series.
    """
    state_file = layout.root / metrics["checkpoints"] / f"checkpoint-{metrics['steps']}" / "trainer_state.json"
    if not state_file.is_file():
        return []
    history = json.loads(state_file.read_text()).get("log_history", [])
    return [{"step": e["step"], **{k: e[k] for k in keys if k in e}} for e in history if any(k in e for k in keys)]


def run(params: Params, layout: Layout) -> StageResult:
    import datasets

    section = params.dpo
    runtime = training.setup_runtime(params.compute, params.seed)
    domains = [d for d, w in params.mixtures[STAGE].weights.items() if w > 0]

    # 1. The sft model (hash-checked) as the policy, with `dpo.lora` a LoRA adapter on it; and the
    #    frozen reference DPO pulls towards: a second copy, or, with an adapter, the adapter-free base
    #    (TRL switches the adapter off for the reference when ref_model is None).
    parent = layout.model(PARENT)
    loaded = adapters.load_input_model(layout, STAGE, parent, params, runtime)
    reference = (
        None
        if loaded.adapter
        else modeling.load_stage_model(parent, trust_remote_code=params.model.trust_remote_code).model
    )
    model, tokenizer = loaded.model, loaded.tokenizer

    # 2. Preference pairs: the mixture's offline pairs, or on-policy pairs from the sft model's samples.
    rows = training.read_mixture(layout, STAGE, preferences.PAIR_COLUMNS).to_list()
    pair_counts: dict[str, Any] = {"on_policy": 0, "offline": len(rows)}
    sampling_seconds = 0.0
    if section.pairs == "on_policy":
        started = time.perf_counter()
        rows, counts = preferences.build_on_policy_pairs(
            model,
            tokenizer,
            rows,
            samples=section.on_policy_samples,
            max_new_tokens=answer_budget(tokenizer, [r["answer"] for r in rows]),
            seed=params.seed,
        )
        sampling_seconds = time.perf_counter() - started
        pair_counts = counts.as_dict()
        log.info("dpo: %s (sampling took %.1f s)", pair_counts, sampling_seconds)
    where = str(layout.mixture(STAGE) / "train.parquet")
    texts = [r["prompt"] + r[side] for side in ("chosen", "rejected") for r in rows]
    training.check_lengths(
        texts, [r["id"] for r in rows] * 2, tokenizer, section.max_length, section.on_too_long, where
    )
    train_dataset = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    # 3. Held-out margin of the input model (the "before" side).
    held_out = held_out_pairs(layout, domains, section.eval_items, params.seed)
    margins_before = preferences.preference_margins(model, tokenizer, held_out)

    # 4. DPO, through the shared trainer set-up (checkpoints, resume, guards, atomic save, lineage).
    from trl import DPOConfig, DPOTrainer

    job = training.TrainingJob(
        stage=STAGE,
        section=section,
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        data_manifest=training.mixture_manifest(layout, STAGE),
        parents=[parent],
        config_cls=DPOConfig,
        trainer_cls=DPOTrainer,
        config_fields={"beta": section.beta},
        trainer_kwargs={"ref_model": reference},
        adapter=loaded.adapter,
        metrics_extra={"dpo_domains": domains, "pairs": section.pairs, "pair_counts": pair_counts},
    )
    result = training.run_training(job, params, layout, runtime)
    if result.model_dir is None:  # a non-main rank under accelerate: rank 0 writes the metrics
        return result

    # 5. The same held-out pairs under the trained policy (the "after" side).
    margins_after = preferences.preference_margins(job.model, tokenizer, held_out)
    before, after = statistics.fmean(margins_before), statistics.fmean(margins_after)
    metrics_path = layout.metrics(STAGE)
    metrics = json.loads(metrics_path.read_text())
    series = training_series(layout, metrics, TRL_SERIES)
    trl_margins = [e["rewards/margins"] for e in series if "rewards/margins" in e]
    extra: dict[str, Any] = {
        "held_out_pairs": len(held_out),
        "logp_margin_before": before,
        "logp_margin_after": after,
        # beta * (policy log-ratio margin - reference log-ratio margin); 0 before training by definition.
        "reward_margin_after": section.beta * (after - before),
        "preference_accuracy_before": statistics.fmean(m > 0 for m in margins_before),
        "preference_accuracy_after": statistics.fmean(m > 0 for m in margins_after),
        "train_reward_margin_first": trl_margins[0] if trl_margins else None,
        "train_reward_margin_last": trl_margins[-1] if trl_margins else None,
        "train_series": series,
        "sampling_seconds": round(sampling_seconds, 2),
        "exact_match_before": {d: metrics["val_before"].get(d, {}).get("exact_match") for d in domains},
        "exact_match_after": {d: metrics["val_after"].get(d, {}).get("exact_match") for d in domains},
    }
    # run_training has already written the model and the metrics; measurements taken after it are merged in.
    write_json_atomic(metrics_path, {**metrics, **extra})
    result.metrics.update({k: v for k, v in extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    log.info("dpo: held-out log-prob margin %.3f -> %.3f", before, after)
    return result


if __name__ == "__main__":
    stage_main(STAGE, run)
