"""Stage `dpo`: direct preference optimisation of the sft model.

TRL's DPOTrainer with an explicit frozen reference (a second, hash-checked copy of the sft model).
Pairs: the `dpo` mixture's offline pairs (a user's own, or chosen = verified answer and rejected =
a plausible wrong one) or on-policy pairs from the model's samples (posttrain.training.preferences).
Held-out margins before/after: posttrain.training.measures; exact match: continual evaluation.

    reads   artifacts/models/sft/, artifacts/data/mixtures/dpo/, artifacts/data/prepared/*/val
    writes  artifacts/models/dpo/ (+ lineage.json), artifacts/metrics/dpo.json
"""

from __future__ import annotations

from posttrain.config import Params
from posttrain.layout import Layout
from posttrain.models import loading
from posttrain.pipeline.entry import stage_main
from posttrain.runtime import setup_runtime
from posttrain.scoring.engines import stage_engine
from posttrain.scoring.generation import chat_validation_items
from posttrain.scoring.preference import offline_pairs
from posttrain.spec import stage_spec
from posttrain.stage import StageResult
from posttrain.training import inputs, measures, preferences
from posttrain.training.job import TrainingJob, run_training

STAGE = "dpo"


def run(params: Params, layout: Layout) -> StageResult:
    spec = stage_spec(params, layout.root, STAGE)
    from trl import DPOConfig, DPOTrainer

    section = params.dpo
    runtime = setup_runtime(params.compute, params.seed, params.model.attn_implementation)
    domains = inputs.mixture_domains(params.mixtures[STAGE].weights)

    # 1. The sft model as the policy (`dpo.lora`: a LoRA adapter on it) and the frozen reference: a second
    #    copy, or with an adapter the adapter-free base (TRL switches the adapter off when ref_model is None).
    parent = layout.model(spec.parents[0])
    loaded = loading.load_for_training(layout, STAGE, parent, params, runtime)
    trust = params.model.trust_remote_code
    reference = (
        None
        if loaded.adapter
        else loading.load_stage_model(
            parent, trust_remote_code=trust, attn_implementation=runtime.attn_implementation
        ).model
    )
    model, tokenizer = loaded.model, loaded.tokenizer

    # 2. Preference pairs: the mixture's offline pairs, or on-policy pairs from the sft model's samples.
    rows, where = inputs.load_mixture_rows(layout, STAGE, preferences.PAIR_COLUMNS, tokenizer)  # chat pairs: templated
    engine, engine_options = stage_engine(params, STAGE, runtime.device)
    rows, pair_metrics = preferences.training_pairs(
        section, model, tokenizer, rows, params.seed, engine, engine_options
    )
    train_dataset = preferences.pair_dataset(rows, tokenizer, section, where)  # both sides' lengths checked

    # 3. Held-out offline pairs (never trained on): the input model's margins now, the trained model's after.
    items = inputs.first_validation_items(layout, domains, section.eval_items)
    held_out = offline_pairs(chat_validation_items(tokenizer, items, "dpo held-out pairs"), params.seed)
    margins = measures.dpo_hook(model, tokenizer, held_out, section.beta, domains)

    # 4. DPO through the shared trainer set-up (checkpoints, resume, guards, atomic save, lineage).
    job = TrainingJob(
        spec=spec,
        section=section,
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        data_manifest=inputs.mixture_manifest(layout, STAGE),
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
