"""Stage `pretrain`: bootstrap the base model.

model.base: scratch   train a BPE tokenizer on the train splits of model.tokenizer.domains
                      (default: every domain), or read a real one from model.tokenizer.path, build
                      a Llama from model.architecture (random weights), and train it on the
                      `pretrain` mixture (text)
model.base: <id/dir>  load that model with from_pretrained and write it out unchanged (no
                      training): the next stages start from it, lineage.json says so

reads   artifacts/data/prepared/<d>/{train,val}.parquet for d in model.tokenizer.domains (its deps
        name these domains, not all prepared data: a domain added later must not rerun pretrain),
        artifacts/data/mixtures/pretrain/
writes  artifacts/models/pretrain/ (+ lineage.json), artifacts/metrics/pretrain.json,
        artifacts/plots/pretrain_continual_eval.{png,json}
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from posttrain.config import Params
from posttrain.errors import DataError
from posttrain.io import sha256_file
from posttrain.layout import Layout
from posttrain.lineage import file_hashes, parent_entry
from posttrain.models import build, chat_template
from posttrain.pipeline.entry import stage_main
from posttrain.runtime import Runtime, setup_runtime
from posttrain.spec import stage_spec
from posttrain.stage import StageResult
from posttrain.training.callbacks import evaluate_domains
from posttrain.training.inputs import load_text_mixture, load_validation_sets, mixture_manifest
from posttrain.training.job import TrainingJob, run_training
from posttrain.training.outputs import write_model_output

log = logging.getLogger("posttrain.pretrain")
STAGE = "pretrain"


def prepared_texts(layout: Layout, domains: list[str]) -> Iterator[str]:
    """The `text` of every domain's train split: what the scratch tokenizer is trained on."""
    import pandas as pd

    for domain in domains:
        path = layout.prepared_split(domain, "train")
        if not path.is_file():
            raise DataError(f"{path}: not found; run the prepare stage first (python -m stages.prepare)")
        yield from pd.read_parquet(path, columns=["text"])["text"].tolist()


def run(params: Params, layout: Layout) -> StageResult:
    section = params.pretrain
    runtime = setup_runtime(params.compute, params.seed, params.model.attn_implementation)
    domains = params.pretrain_domains()
    if params.model.base != "scratch":
        return use_given_base(params, layout, runtime)

    # 1. Tokenizer (trained on the prepared data, or a real one from model.tokenizer.path) and a model
    #    from scratch (seeded by setup_runtime, so the init is reproducible).
    folder = params.model.tokenizer.path
    if folder:
        tokenizer = build.load_tokenizer_folder(folder, layout.root)
        tokenizer_data = file_hashes(layout.root / folder)
    else:
        tokenizer = build.train_tokenizer(
            prepared_texts(layout, domains),
            params.model.tokenizer,
            max_length=params.model.architecture.max_position_embeddings,
            extra_special=chat_template.special_tokens_of(params.model.chat_template or ""),
        )
        tokenizer_data = {d: sha256_file(layout.prepared_split(d, "train")) for d in domains}
    model = build.build_scratch_model(params.model.architecture, tokenizer, runtime.attn_implementation)
    build.install_template(model, tokenizer, params.model, layout.root)
    log.info("scratch model: %d parameters, vocabulary %d", build.count_parameters(model), len(tokenizer))

    # 2. Train on the pretrain mixture as plain language modelling.
    job = TrainingJob(
        spec=stage_spec(params, layout.root, STAGE),
        section=section,
        model=model,
        tokenizer=tokenizer,
        train_dataset=load_text_mixture(layout, STAGE, tokenizer, section),
        data_manifest=mixture_manifest(layout, STAGE),
        # The tokenizer is trained on the prepared data, so it and the architecture define the run too.
        key_inputs={
            "model": params.model.model_dump(mode="json"),
            "tokenizer_data": tokenizer_data,
        },
        eval_domains=domains,
        lineage_extra={"base": "scratch", "model": params.model.model_dump(mode="json")},
    )
    return run_training(job, params, layout, runtime)


def use_given_base(params: Params, layout: Layout, runtime: Runtime) -> StageResult:
    """No training: re-save the configured base so every later stage reads one verified folder."""
    loaded = build.load_base(params.model, layout.root)
    domains = params.pretrain.eval_domains or params.pretrain_domains()
    sets = load_validation_sets(layout, domains, params.pretrain.eval_items, loaded.tokenizer)
    scores = evaluate_domains(loaded.model, loaded.tokenizer, sets)
    parents = [parent_entry(loaded.path, layout.root)] if loaded.path else []
    log.info("model.base is %r: no pretraining, the base is written out as the pretrain model", params.model.base)
    return write_model_output(
        STAGE,
        loaded.model,
        loaded.tokenizer,
        params=params,
        layout=layout,
        section=params.pretrain,
        parents=parents,
        data_manifest=None,
        metrics={
            "stage": STAGE,
            "trained": False,
            "base": params.model.base,
            "steps": 0,
            "parameters": build.count_parameters(loaded.model),
            "val_before": scores,
            "val_after": scores,
        },
        lineage_extra={"base": params.model.base, "revision": params.model.revision, "trained": False},
    )


if __name__ == "__main__":
    stage_main(STAGE, run)
