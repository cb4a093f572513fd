"""Stage `cpt`: continual pretraining of the pretrain model on new-domain text, with replay.

The `cpt` mixture holds the new domain(s) plus a replayed share of the pretrain mixture (built by
the mix stage). The default schedule re-warms the learning rate, holds it and decays it (WSD); the
continual-evaluation series shows the stability gap on the old domains and the gain on the new.

    reads   artifacts/models/pretrain/, artifacts/data/mixtures/cpt/, artifacts/data/prepared/*/val
    writes  artifacts/models/cpt/ (+ lineage.json), artifacts/metrics/cpt.json,
            artifacts/plots/cpt_continual_eval.{png,json}
"""

from __future__ import annotations

from posttrain.config import Params
from posttrain.layout import Layout
from posttrain.models import loading
from posttrain.pipeline.entry import stage_main
from posttrain.runtime import setup_runtime
from posttrain.spec import stage_spec
from posttrain.stage import StageResult
from posttrain.training.inputs import load_text_mixture, mixture_manifest
from posttrain.training.job import TrainingJob, run_training

STAGE = "cpt"


def run(params: Params, layout: Layout) -> StageResult:
    spec = stage_spec(params, layout.root, STAGE)
    section = params.cpt
    runtime = setup_runtime(params.compute, params.seed, params.model.attn_implementation)

    # 1. The pretrain model, its files checked against their lineage hashes.
    parent = layout.model(spec.parents[0])
    # With `lora:` set: a fresh adapter on it, or the adapter it passed on, trained further (posttrain.models.lora).
    loaded = loading.load_for_training(layout, STAGE, parent, params, runtime)

    # 2. Causal-LM training on the cpt mixture (new domain + replay), schedule from params.yaml.
    mixture = params.mixtures[STAGE]
    job = TrainingJob(
        spec=spec,
        section=section,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        train_dataset=load_text_mixture(layout, STAGE, loaded.tokenizer, section),
        data_manifest=mixture_manifest(layout, STAGE),
        adapter=loaded.adapter,
        metrics_extra={
            "target_domains": sorted(d for d, w in mixture.weights.items() if w > 0),
            "replay": mixture.replay.model_dump() if mixture.replay else None,
        },
    )
    return run_training(job, params, layout, runtime)


if __name__ == "__main__":
    stage_main(STAGE, run)
