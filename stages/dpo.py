"""Stage `dpo`: direct preference optimisation of the sft model.

TRL's DPOTrainer with an explicit frozen reference: a second, hash-checked copy of the input (sft)
model. Pairs come from the `dpo` mixture (`pairs: offline`: chosen = the verified answer, rejected =
the data layer's plausible wrong answer) or from the input model's own samples (`pairs: on_policy`,
posttrain.training.preferences). Measured on held-out offline pairs (posttrain.training.measures):
log-probability and implicit reward margins before/after; exact match per domain before/after
comes from the shared continual evaluation (`val_before` / `val_after`); DPO must not lower it.

    reads   artifacts/models/sft/, artifacts/data/mixtures/dpo/, artifacts/data/prepared/*/val
    writes  artifacts/models/dpo/ (+ lineage.json), artifacts/metrics/dpo.json
"""

from __future__ import annotations

from posttrain.config import Params
from posttrain.layout import Layout
from posttrain.models import loading
from posttrain.pipeline.entry import stage_main
from posttrain.runtime import setup_runtime
from posttrain.stage import StageResult
from posttrain.training import measures, preferences
from posttrain.training.data import (
    chat_mixture_row,
    chat_validation_items,
    check_lengths,
    first_validation_items,
    is_conversational_mixture,
    mixture_manifest,
    read_mixture,
)
from posttrain.training.job import TrainingJob, run_training

STAGE = "dpo"
PARENT = "sft"


def run(params: Params, layout: Layout) -> StageResult:
    import datasets  # lazy: heavy, and importing a stage module must stay cheap (DVC deps test, docs)
    from trl import DPOConfig, DPOTrainer  # lazy: trl alone costs ~8 s to import

    section = params.dpo
    runtime = setup_runtime(params.compute, params.seed)
    domains = [d for d, w in params.mixtures[STAGE].weights.items() if w > 0]

    # 1. The sft model as the policy (`dpo.lora`: a LoRA adapter on it) and the frozen reference: a second
    #    copy, or with an adapter the adapter-free base (TRL switches the adapter off when ref_model is None).
    parent = layout.model(PARENT)
    loaded = loading.load_for_training(layout, STAGE, parent, params, runtime)
    trust = params.model.trust_remote_code
    reference = None if loaded.adapter else loading.load_stage_model(parent, trust_remote_code=trust).model
    model, tokenizer = loaded.model, loaded.tokenizer

    # 2. Preference pairs: the mixture's offline pairs, or on-policy pairs from the sft model's samples.
    rows = read_mixture(layout, STAGE, preferences.PAIR_COLUMNS).to_list()
    where = str(layout.mixture(STAGE) / "train.parquet")
    if is_conversational_mixture(layout, STAGE):  # the user's (or generated) chat pairs, through the template
        rows = [chat_mixture_row(tokenizer, row, where) for row in rows]
    rows, pair_metrics = preferences.training_pairs(section, model, tokenizer, rows, params.seed)
    texts = [r["prompt"] + r[side] for side in ("chosen", "rejected") for r in rows]
    check_lengths(texts, [r["id"] for r in rows] * 2, tokenizer, section.max_length, section.on_too_long, where)
    train_dataset = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    # 3. Held-out offline pairs (never trained on): the input model's margins now, the trained model's after.
    items = first_validation_items(layout, domains, section.eval_items)
    held_out = preferences.offline_pairs(chat_validation_items(tokenizer, items, "dpo held-out pairs"), params.seed)
    margins = measures.dpo_hook(model, tokenizer, held_out, section.beta, domains)

    # 4. DPO through the shared trainer set-up (checkpoints, resume, guards, atomic save, lineage).
    job = TrainingJob(
        stage=STAGE,
        section=section,
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        data_manifest=mixture_manifest(layout, STAGE),
        parents=[parent],
        config_cls=DPOConfig,
        trainer_cls=DPOTrainer,
        config_fields={"beta": section.beta},
        trainer_kwargs={"ref_model": reference},
        adapter=loaded.adapter,
        metrics_extra={"dpo_domains": domains, **pair_metrics},
        measure=[margins],
    )
    return run_training(job, params, layout, runtime)


if __name__ == "__main__":
    stage_main(STAGE, run)
