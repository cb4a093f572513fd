"""Stage `pretrain`: bootstrap the base model.

model.base: scratch   train a BPE tokenizer on the train splits of model.tokenizer.domains
                      (default: every domain), build a tiny Llama from model.architecture, and
                      train it on the `pretrain` mixture (text)
model.base: <id/dir>  load that model with from_pretrained and write it out unchanged (no
                      training): the next stages start from it, lineage.json says so

reads   artifacts/data/prepared/<d>/{train,val}.parquet for d in model.tokenizer.domains (each
        must be a dep in dvc.yaml: a domain added later must not rerun pretrain, so the deps name
        these domains, not all prepared data), artifacts/data/mixtures/pretrain/
writes  artifacts/models/pretrain/ (+ lineage.json), artifacts/metrics/pretrain.json,
        artifacts/plots/pretrain_continual_eval.{png,json}
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from posttrain.config import Params
from posttrain.dvcfile import stage_deps
from posttrain.errors import DataError, ParamsError
from posttrain.io import sha256_file
from posttrain.layout import Layout
from posttrain.lineage import parent_entry
from posttrain.models import build, chat_template
from posttrain.pipeline.entry import stage_main
from posttrain.runtime import Runtime, setup_runtime
from posttrain.stage import StageResult
from posttrain.training.callbacks import evaluate_domains
from posttrain.training.data import load_text_mixture, load_validation_sets, mixture_manifest
from posttrain.training.job import TrainingJob, run_training
from posttrain.training.outputs import write_model_output

log = logging.getLogger("posttrain.pretrain")
STAGE = "pretrain"


def prepared_texts(layout: Layout, domains: list[str]) -> Iterator[str]:
    """The `text` of every domain's train split: what the scratch tokenizer is trained on."""
    # lazy: pandas is heavy to import; only this path needs it
    import pandas as pd

    for domain in domains:
        path = layout.prepared_split(domain, "train")
        if not path.is_file():
            raise DataError(f"{path}: not found; run the prepare stage first (python -m stages.prepare)")
        yield from pd.read_parquet(path, columns=["text"])["text"].tolist()


def check_declared_deps(layout: Layout, domains: list[str]) -> None:
    """Each domain pretrain reads is a dep of the stage in dvc.yaml (else DVC would not rerun it)."""
    deps = stage_deps(layout.root, STAGE)
    if deps is None:  # not run from a DVC project (e.g. a test calling the stage directly)
        return
    prepared = layout.prepared.relative_to(layout.root).as_posix()
    missing = [d for d in domains if prepared not in deps and f"{prepared}/{d}" not in deps]
    if missing:
        raise ParamsError(
            f"{layout.root / 'dvc.yaml'}: stage {STAGE} reads the prepared data of {missing} "
            f"(model.tokenizer.domains) but does not list it in deps; run `posttrain sync-deps` (or add "
            f"{[f'{prepared}/{d}' for d in missing]})"
        )


def run(params: Params, layout: Layout) -> StageResult:
    section = params.pretrain
    runtime = setup_runtime(params.compute, params.seed)
    domains = params.pretrain_domains()
    check_declared_deps(layout, domains)
    if params.model.base != "scratch":
        return use_given_base(params, layout, runtime)

    # 1. Tokenizer and model from scratch (seeded by setup_runtime, so the init is reproducible).
    tokenizer = build.train_tokenizer(
        prepared_texts(layout, domains),
        params.model.tokenizer,
        max_length=params.model.architecture.max_position_embeddings,
        extra_special=chat_template.special_tokens_of(params.model.chat_template or ""),
    )
    model = build.build_scratch_model(params.model.architecture, tokenizer)
    build.install_template(model, tokenizer, params.model, layout.root)
    log.info("scratch model: %d parameters, vocabulary %d", build.count_parameters(model), len(tokenizer))

    # 2. Train on the pretrain mixture as plain language modelling.
    job = TrainingJob(
        stage=STAGE,
        section=section,
        model=model,
        tokenizer=tokenizer,
        train_dataset=load_text_mixture(layout, STAGE, tokenizer, section),
        data_manifest=mixture_manifest(layout, STAGE),
        # The tokenizer is trained on the prepared data, so it and the architecture define the run too.
        key_inputs={
            "model": params.model.model_dump(mode="json"),
            "tokenizer_data": {d: sha256_file(layout.prepared_split(d, "train")) for d in domains},
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
