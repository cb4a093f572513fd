"""Stage `grpo`: group relative policy optimisation of the dpo model with verifiable rewards.

TRL's GRPOTrainer samples `num_generations` completions per prompt of the `grpo` mixture, scores them
with the rewards named in `grpo.rewards` (posttrain.scoring.rewards) and pushes up the completions
that beat their group's mean; a group whose completions all score the same gives no signal (hence
`add3` with partial credit in the default recipe). Held-out rewards before/after:
posttrain.training.measures. Off by default: `grpo.curriculum`, `grpo.hybrid` (training.grpo_options).

    reads   artifacts/models/dpo/, artifacts/data/mixtures/grpo/, artifacts/data/prepared/*/val
    writes  artifacts/models/grpo/ (+ lineage.json), artifacts/metrics/grpo.json, artifacts/plots/grpo_*
"""

from __future__ import annotations

from posttrain.config import Params
from posttrain.layout import Layout
from posttrain.models import loading
from posttrain.pipeline.entry import stage_main
from posttrain.runtime import setup_runtime
from posttrain.scoring import rewards
from posttrain.scoring.generation import chat_record
from posttrain.stage import StageResult
from posttrain.training import data, measures, no_learning
from posttrain.training.grpo_options import with_options
from posttrain.training.job import TrainingJob, run_training

STAGE = "grpo"
PARENT = "dpo"


def run(params: Params, layout: Layout) -> StageResult:
    import datasets  # lazy: heavy, and importing a stage module must stay cheap (DVC deps test, docs)
    from trl import GRPOConfig, GRPOTrainer  # lazy: trl alone costs ~8 s to import

    section = params.grpo
    runtime = setup_runtime(params.compute, params.seed)
    domains = data.mixture_domains(params.mixtures[STAGE].weights)
    # Unknown names were refused at validation; this builds the guarded callables (errors name the function).
    reward_funcs, reward_weights = rewards.build_rewards(section.rewards)

    # 1. The dpo model, hash-checked; with `grpo.lora` a LoRA adapter on it, or the one dpo passed on.
    parent = layout.model(PARENT)
    loaded = loading.load_for_training(layout, STAGE, parent, params, runtime)
    model, tokenizer = loaded.model, loaded.tokenizer

    # 2. Prompts (chat ones through the template) + gold `answer` (TRL passes it to the reward functions).
    rows = data.load_prompt_answer_rows(layout, STAGE, tokenizer, section)

    # 3. Rewards on held-out prompts: the input model's now, the trained model's after training. Where most
    #    groups of samples all score the same, GRPO has no gradient: say so, or stop here (grpo.no_learning).
    held_out = [chat_record(tokenizer, r) for r in data.first_validation_items(layout, domains, section.eval_items)]
    before = measures.grpo_before(model, tokenizer, section, held_out, params.seed, STAGE)
    scores = measures.grpo_hook(section, held_out, before, params.seed, layout, STAGE)
    zero_variance = no_learning.zero_variance_check(
        section.no_learning, before["sampled_zero_variance_groups"], len(held_out)
    )
    no_learning.enforce(STAGE, section.no_learning, [zero_variance])

    # 4. Optional curriculum / hybrid SFT<->RL (posttrain.training.grpo_options).
    trainer_cls, trainer_kwargs, hooks = with_options(GRPOTrainer, section, rows, layout, STAGE)

    # 5. GRPO through the shared trainer set-up.
    config_fields = {"num_generations": section.num_generations, "max_completion_length": section.max_completion_length,
                     "temperature": section.temperature, "beta": section.beta, "reward_weights": reward_weights}  # fmt: skip
    job = TrainingJob(
        stage=STAGE,
        section=section,
        model=model,
        tokenizer=tokenizer,
        train_dataset=datasets.Dataset.from_list(rows),
        data_manifest=data.mixture_manifest(layout, STAGE),
        parents=[parent],
        config_cls=GRPOConfig,
        trainer_cls=trainer_cls,
        config_fields=config_fields,
        trainer_kwargs={"reward_funcs": reward_funcs, **trainer_kwargs},
        adapter=loaded.adapter,
        metrics_extra={"grpo_domains": domains, "rewards": [s.model_dump() for s in section.rewards]},
        measure=[scores, *hooks],
        learning_checks=[zero_variance],
    )
    return run_training(job, params, layout, runtime)


if __name__ == "__main__":
    stage_main(STAGE, run)
