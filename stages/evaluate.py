"""Stage `evaluate`: score every model of `evaluate.models` on each domain's held-out test split.

Per model per domain: greedy exact match (the domain's verifier), pass@k from sampling, loss and
perplexity on `text`, each with a bootstrap CI; then the forgetting matrix along the pipeline order
of `evaluate.models`. Writes artifacts/metrics/eval.json (schema: docs/eval-schema.md) and plots in
artifacts/plots/.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from posttrain.config import TRAINING_STAGES, LmEvalConfig, Params
from posttrain.data.verifiers import VERIFIERS
from posttrain.errors import DataError, ParamsError, StageError
from posttrain.io import json_hash
from posttrain.layout import Layout
from posttrain.models.build import check_same_tokenizer, tokenizer_signature
from posttrain.models.loading import load_stage_model
from posttrain.pipeline.entry import stage_main
from posttrain.runtime import setup_runtime
from posttrain.scoring import lm_eval_tasks
from posttrain.scoring.engines import stage_engine
from posttrain.scoring.evaluation import EvalSettings, ModelAnswerer, build_report, evaluate_domain, preference_entry
from posttrain.scoring.generation import chat_record, chat_validation_items
from posttrain.scoring.lm_eval_tasks import TaskSpec
from posttrain.scoring.plots import plot_forgetting, plot_scores, plot_stability_gap
from posttrain.scoring.preference import offline_pairs, preference_margins
from posttrain.scoring.report import lineage_of, write_report
from posttrain.stage import StageResult

log = logging.getLogger("posttrain.evaluate")

TEST_COLUMNS = ("id", "domain", "prompt", "answer", "text", "verifier")


def load_test_sets(layout: Layout, domains: list[str], max_items: int) -> dict[str, Any]:
    """First `max_items` rows of each domain's test split (the split order is fixed by `prepare`)."""
    import pandas as pd

    sets = {}
    for domain in domains:
        path = layout.prepared_split(domain, "test")
        if not path.is_file():
            raise DataError(f"{path}: test split of domain '{domain}' not found; has the prepare stage run?")
        frame = pd.read_parquet(path)
        missing = [c for c in TEST_COLUMNS if c not in frame.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; expected columns {list(TEST_COLUMNS)}")
        frame = frame.head(max_items).reset_index(drop=True)
        if frame.empty:
            raise DataError(f"{path}: test split of domain '{domain}' is empty; expected at least one row")
        sets[domain] = frame
    return sets


def continual_series(layout: Layout, stages: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The training stages' `continual_eval` series from their metrics JSON, where present."""
    series = {}
    for stage in stages:
        path = layout.metrics(stage)
        if stage in TRAINING_STAGES and path.is_file():
            rows = json.loads(path.read_text()).get("continual_eval") or []
            if rows:
                series[stage] = rows
    return series


def run_lm_eval(
    cfg: LmEvalConfig, model_dir: Path, tests: dict[str, Any], layout: Layout, stage: str, params: Params
) -> dict[str, dict[str, float | None]]:
    """lm-evaluation-harness on one model folder: project tasks from the test splits, scores + stderr."""
    specs = []
    for task in cfg.tasks:
        if task.domain not in tests:
            raise ParamsError(
                f"evaluate.lm_eval.tasks: domain {task.domain!r} is not evaluated; expected one of {sorted(tests)}"
            )
        records = tests[task.domain].fillna("").head(cfg.max_items).to_dict("records")
        specs.append(TaskSpec(f"{task.domain}_{task.kind}", task.kind, records, task.max_gen_toks))
    scores = lm_eval_tasks.run(
        model_dir,
        specs,
        layout.artifacts / "lm_eval" / stage,
        chat=params.model.chat_template is not None,
        batch_size=cfg.batch_size,
        seed=params.seed,
    )
    # lm-eval has no stderr for corpus-level perplexities (NaN): null in JSON.
    return {t: {k: (None if math.isnan(v) else v) for k, v in m.items()} for t, m in scores.items()}


def score_preferences(model: Any, tokenizer: Any, frame: Any, seed: int, settings: EvalSettings) -> dict[str, Any]:
    """Preference accuracy and margin on a domain's test items as pairs (the same pairs for every model:
    the wrong answers are drawn with `evaluate.seed`)."""
    records = chat_validation_items(tokenizer, frame.fillna("").to_dict("records"), "evaluate.preference_domains")
    pairs = offline_pairs(records, seed)
    return {**preference_entry(preference_margins(model, tokenizer, pairs), settings), "n_pairs": len(pairs)}


def run(params: Params, layout: Layout) -> StageResult:
    import pandas as pd
    import torch

    cfg = params.evaluate
    runtime = setup_runtime(params.compute, params.seed)
    # One engine for every model: scores made by different engines are not compared (promotion refuses to).
    engine, options = stage_engine(params, "evaluate", runtime.device)
    log.info("evaluate: generation engine %s (setting: %s)", engine, options.engine)
    domains = list(cfg.domains or params.data.domains)
    tests = load_test_sets(layout, domains, cfg.max_items)
    settings = EvalSettings(
        bootstrap_samples=cfg.bootstrap_samples,
        confidence=cfg.confidence,
        seed=cfg.seed,
        pass_n=cfg.pass_at_k.n,
        pass_k=tuple(cfg.pass_at_k.k),
        pass_temperature=cfg.pass_at_k.temperature,
        pass_max_items=cfg.pass_at_k.max_items,
    )
    results: dict[str, dict[str, Any]] = {}
    per_item: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    reference: tuple[str, dict[str, Any]] | None = None  # (folder, tokenizer signature) of the first model
    lm_eval_scores: dict[str, dict[str, Any]] = {}
    for stage in cfg.models:
        model_dir = layout.model(stage)
        if not model_dir.is_dir():
            raise StageError(
                f"evaluate.models lists '{stage}' but {model_dir} does not exist; run that stage first "
                "or remove it from evaluate.models"
            )
        started = time.perf_counter()
        loaded = load_stage_model(model_dir, trust_remote_code=params.model.trust_remote_code)
        # Every model is scored with its own tokenizer on the same prompts: they must all agree
        # (vocabulary, EOS/PAD, template), or scores differ for a reason that is not the model.
        signature = tokenizer_signature(loaded.tokenizer)
        if reference is None:
            reference = (str(model_dir), signature)
        check_same_tokenizer(reference[1], signature, reference_where=reference[0], other_where=str(model_dir))
        model = loaded.model.to(runtime.device)
        if runtime.precision == "bf16":
            model = model.to(torch.bfloat16)
        answerer = ModelAnswerer(
            model,
            loaded.tokenizer,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            engine=engine,
            options=options,
        )
        results[stage], per_item[stage] = {}, {}
        for domain, frame in tests.items():
            # Conversational items are scored through the model's chat template (the one the pipeline checked).
            frame = pd.DataFrame([chat_record(loaded.tokenizer, r) for r in frame.fillna("").to_dict("records")])
            entry, vectors = evaluate_domain(answerer, frame, VERIFIERS, settings)
            if domain in cfg.preference_domains:
                entry["preference"] = score_preferences(model, loaded.tokenizer, tests[domain], cfg.seed, settings)
            results[stage][domain], per_item[stage][domain] = entry, vectors
            em = entry["exact_match"]
            log.info(
                "%s/%s: exact match %s, loss %s (%.1f s)",
                stage,
                domain,
                f"{em['mean']:.3f} [{em['ci_low']:.3f}, {em['ci_high']:.3f}]" if em else "n/a",
                f"{entry['loss']['mean']:.3f}" if entry["loss"] and entry["loss"]["mean"] is not None else "n/a",
                entry["seconds"]["total"],
            )
        if cfg.lm_eval is not None:
            lm_eval_scores[stage] = run_lm_eval(cfg.lm_eval, model_dir, tests, layout, stage, params)
        lineage = loaded.lineage or {}
        info[stage] = {
            "path": model_dir.relative_to(layout.root).as_posix(),
            "content_hash": lineage.get("content_hash"),
            # Every model it descends from (lineage.json files): the promotion rules compare it with them.
            "lineage": lineage_of(layout, model_dir),
            "load_seconds": round(
                time.perf_counter() - started - sum(r["seconds"]["total"] for r in results[stage].values()), 4
            ),
            # Greedy and sampled generation of this model over every domain: what the engine delivered.
            "generation": {"engine": engine, **answerer.stats.as_dict()},
        }
        log.info("%s: generated %s", stage, info[stage]["generation"])
        del loaded, model, answerer

    report = build_report(
        results,
        per_item,
        cfg.models,
        domains,
        settings,
        models_info=info,
        config=cfg.model_dump(mode="json"),
        prepared_manifest_hash=json_hash(layout.prepared / "manifest.json"),
        engine=engine,
    )
    if cfg.lm_eval is not None:
        report["lm_eval"] = lm_eval_scores
    typed = write_report(layout.metrics("eval"), report)
    artifacts = [layout.metrics("eval")]
    artifacts += plot_scores(typed, layout.plots)
    artifacts += plot_forgetting(typed, layout.plots)
    artifacts += plot_stability_gap(continual_series(layout, list(cfg.models)), list(cfg.models), layout.plots)
    return StageResult(metrics=report["summary"], artifacts=artifacts)


if __name__ == "__main__":
    stage_main("evaluate", run)
