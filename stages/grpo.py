"""Stage `grpo`: group relative policy optimisation of the dpo model with verifiable rewards.

TRL's GRPOTrainer samples `num_generations` completions per prompt of the `grpo` mixture (`prompt`,
`answer`, ...), scores them with the reward functions named in `grpo.rewards` (posttrain.scoring.rewards,
combined with their weights) and pushes up the completions that beat their group's mean. A group
whose completions all score the same gives no signal: that is why the default recipe trains on
harder items (`add3`) with partial credit (`digit_match`). Measured before/after on held-out prompts
(posttrain.training.measures): greedy and sampled reward, greedy exact match, zero-variance groups.
Options (off by default): `grpo.curriculum` (a UCB bandit over domains or difficulty buckets picks the
prompts) and `grpo.hybrid` (SFT on the gold answer for prompts whose rollouts fail).

    reads   artifacts/models/dpo/, artifacts/data/mixtures/grpo/, artifacts/data/prepared/*/val
    writes  artifacts/models/grpo/ (+ lineage.json), artifacts/metrics/grpo.json, artifacts/plots/grpo_rewards.json,
            artifacts/plots/grpo_curriculum.{json,png} (with a curriculum)
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
from posttrain.training import measures
from posttrain.training.curriculum import UCBCurriculum, arm_of, curriculum_hook, curriculum_trainer
from posttrain.training.data import (
    chat_mixture_row,
    check_lengths,
    first_validation_items,
    is_conversational_mixture,
    mixture_manifest,
    read_mixture,
)
from posttrain.training.hybrid import hybrid_hook, hybrid_trainer
from posttrain.training.job import TrainingJob, run_training

STAGE = "grpo"
PARENT = "dpo"
COLUMNS = ("id", "domain", "prompt", "answer", "verifier")


def run(params: Params, layout: Layout) -> StageResult:
    import datasets  # lazy: heavy, and importing a stage module must stay cheap (DVC deps test, docs)
    from trl import GRPOConfig, GRPOTrainer  # lazy: trl alone costs ~8 s to import

    section = params.grpo
    runtime = setup_runtime(params.compute, params.seed)
    domains = [d for d, w in params.mixtures[STAGE].weights.items() if w > 0]
    # Unknown names were refused at validation; this builds the guarded callables (errors name the function).
    reward_funcs, reward_weights = rewards.build_rewards(section.rewards)

    # 1. The dpo model, hash-checked; with `grpo.lora` a LoRA adapter on it, or the one dpo passed on.
    parent = layout.model(PARENT)
    loaded = loading.load_for_training(layout, STAGE, parent, params, runtime)
    model, tokenizer = loaded.model, loaded.tokenizer

    # 2. Prompts with their gold `answer` (TRL hands every column but `prompt` to the reward functions).
    data = read_mixture(layout, STAGE, COLUMNS)
    where = str(layout.mixture(STAGE) / "train.parquet")
    if is_conversational_mixture(layout, STAGE):  # prompt turns through the chat template
        data = datasets.Dataset.from_list([chat_mixture_row(tokenizer, row, where) for row in data.to_list()])
    texts = [p + a for p, a in zip(data["prompt"], data["answer"], strict=True)]
    check_lengths(texts, data["id"], tokenizer, section.max_length, section.on_too_long, where)

    # 3. Rewards on held-out prompts: the input model's now, the trained model's after training.
    held_out = [chat_record(tokenizer, r) for r in first_validation_items(layout, domains, section.eval_items)]
    scores = measures.grpo_hook(model, tokenizer, section, held_out, params.seed, layout, STAGE)

    # 4. Optional: a curriculum picks each batch's prompts (posttrain.training.curriculum); the hybrid
    # rule trains prompts whose rollouts fail with SFT on the gold answer (posttrain.training.hybrid).
    trainer_cls, trainer_kwargs, measure = GRPOTrainer, {"reward_funcs": reward_funcs}, [scores]
    if section.curriculum is not None:
        arms = section.curriculum.arms
        curriculum = UCBCurriculum([arm_of(row, arms) for row in data], section.curriculum)
        trainer_cls = curriculum_trainer(trainer_cls)
        trainer_kwargs |= {"curriculum": curriculum, "arm_key": lambda row: arm_of(row, arms)}
        measure.append(curriculum_hook(curriculum, data["id"], layout, STAGE))
    if section.hybrid is not None:
        trainer_cls = hybrid_trainer(trainer_cls)
        trainer_kwargs["hybrid"] = section.hybrid
        measure.append(hybrid_hook())

    # 5. GRPO through the shared trainer set-up.
    config_fields = {"num_generations": section.num_generations, "max_completion_length": section.max_completion_length,
                     "temperature": section.temperature, "beta": section.beta, "reward_weights": reward_weights}  # fmt: skip
    job = TrainingJob(
        stage=STAGE,
        section=section,
        model=model,
        tokenizer=tokenizer,
        train_dataset=data,
        data_manifest=mixture_manifest(layout, STAGE),
        parents=[parent],
        config_cls=GRPOConfig,
        trainer_cls=trainer_cls,
        config_fields=config_fields,
        trainer_kwargs=trainer_kwargs,
        adapter=loaded.adapter,
        metrics_extra={"grpo_domains": domains, "rewards": [s.model_dump() for s in section.rewards]},
        measure=measure,
    )
    return run_training(job, params, layout, runtime)


if __name__ == "__main__":
    stage_main(STAGE, run)
