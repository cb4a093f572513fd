"""Stage `sft`: supervised fine-tuning of the cpt model on prompt/completion pairs.

A variant (`variants.sft.<name>`, run as `python -m stages.sft --variant <name>`) is the same
stage under the name `sft@<name>`: its section with the variant's overrides, its own seed and
mixture (`mixtures.sft@<name>`), written to artifacts/models/sft@<name>/.

TRL's SFTTrainer on a prompt-completion dataset: the loss covers only the completion tokens
(`completion_only_loss=True`; the prompt's labels are -100) and TRL appends the tokenizer's EOS to
every completion, so the model learns to stop after the answer. On a conversational mixture TRL
applies the pipeline's chat template and the loss covers the assistant turns and their end-of-turn
token only (`assistant_only_loss=True`).

    reads   artifacts/models/cpt/, artifacts/data/mixtures/sft/, artifacts/data/prepared/*/val
    writes  artifacts/models/sft/ (+ lineage.json), artifacts/metrics/sft.json,
            artifacts/plots/sft_continual_eval.{png,json}
"""

from __future__ import annotations

from posttrain.config import Params
from posttrain.layout import Layout
from posttrain.models import loading
from posttrain.pipeline.entry import stage_main
from posttrain.runtime import setup_runtime
from posttrain.spec import stage_spec
from posttrain.stage import StageResult
from posttrain.training.inputs import load_sft_mixture, mixture_manifest
from posttrain.training.job import TrainingJob, run_training

STAGE = "sft"


def run(params: Params, layout: Layout, stage: str = STAGE) -> StageResult:
    spec = stage_spec(params, layout.root, stage)
    section = params.stage_section(stage)
    runtime = setup_runtime(params.compute, params.stage_seed(stage), params.model.attn_implementation)

    # 1. The parent model (`sft.parent`, cpt by default), its files checked against their lineage hashes.
    parent = layout.model(spec.parents[0])
    # With `lora:` set: a fresh adapter on it, or the adapter it passed on, trained further (posttrain.models.lora).
    loaded = loading.load_for_training(layout, stage, parent, params, runtime)

    # 2. Prompt/completion fine-tuning, loss on the completion (the answer + EOS) only; on
    # conversations, TRL applies the chat template and the loss covers the assistant turns only.
    train_dataset, loss_fields = load_sft_mixture(layout, stage, loaded.tokenizer, section)
    job = TrainingJob(
        spec=spec,
        section=section,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        train_dataset=train_dataset,
        data_manifest=mixture_manifest(layout, stage),
        adapter=loaded.adapter,
        config_fields=loss_fields,
    )
    return run_training(job, params, layout, runtime)


if __name__ == "__main__":
    stage_main(STAGE, run)
