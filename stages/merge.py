"""Stage `merge`: merge the output models of `merge.models` into artifacts/models/merge.

`wise_ft` interpolates merge.models = [final, base] at the weight chosen on validation items
(posttrain.models.wise_ft): its curve goes to metrics (`wise_ft`) and artifacts/plots/merge_wise_ft.{png,json}.

Method, weights, base, density, t and seed come from the `merge` section of params.yaml (see
posttrain/models/merging.py for the methods). Merge only models of one fine-tuning line (models sharing a
parent); the stage refuses models whose lineage records share no ancestor, or whose tensors,
configs or tokenizers differ.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from posttrain.config import Params, params_hash
from posttrain.io import atomic_output_dir, write_json_atomic
from posttrain.layout import Layout
from posttrain.lineage import parent_entry, verify_model_folder, write_lineage
from posttrain.models import chat_template
from posttrain.models.adamerging import adamerge
from posttrain.models.loading import load_stage_model
from posttrain.models.merging import NEEDS_BASE, check_same_line, last_checkpoints, merge_models
from posttrain.models.wise_ft import CurvePoint, interpolate_, select_alpha
from posttrain.pipeline.entry import stage_main
from posttrain.runtime import setup_runtime
from posttrain.scoring.plots import plot_tradeoff
from posttrain.stage import StageResult
from posttrain.training.callbacks import evaluate_domains
from posttrain.training.inputs import first_validation_items, load_validation_sets

log = logging.getLogger("posttrain.merge")


# What lineage.json and metrics keep of an AdaMerging run (the learned coefficients among them).
ADAMERGING_RECORD = ("granularity", "init", "steps", "prompts", "coefficients", "entropy_before", "entropy_after")


def adamerging_merge(params: Params, layout: Layout, inputs: list[Path], base_dir: Path | None, out: Path) -> dict:
    """AdaMerging on the first `prompts_per_domain` validation prompts of each domain (never test)."""
    cfg = params.merge.adamerging
    domains = cfg.domains or list(params.data.domains)
    prompts = [r["prompt"] for r in first_validation_items(layout, domains, cfg.prompts_per_domain) if r["prompt"]]
    assert base_dir is not None  # the config requires merge.base for adamerging
    return adamerge(
        inputs,
        base_dir,
        out,
        prompts,
        granularity=cfg.granularity,
        steps=cfg.steps,
        lr=cfg.lr,
        init=cfg.init,
        batch_size=cfg.batch_size,
        refresh=cfg.refresh,
        max_new_tokens=cfg.max_new_tokens,
        seed=params.merge.seed,
    )


def wise_ft_curve(params: Params, layout: Layout, final_dir: Path, base_dir: Path) -> dict:
    """Score alpha * final + (1 - alpha) * base at every `merge.wise_ft.alphas` on VALIDATION items (task
    exact match, probe loss) and choose alpha (posttrain.models.wise_ft.select_alpha). No test item is read."""
    cfg = params.merge.wise_ft
    assert cfg is not None  # the config requires merge.wise_ft for method wise_ft
    setup_runtime(params.compute, params.merge.seed)
    final = load_stage_model(final_dir, trust_remote_code=params.model.trust_remote_code)
    base = load_stage_model(base_dir, trust_remote_code=params.model.trust_remote_code).model
    model, tokenizer = final.model, final.tokenizer
    final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_state = base.state_dict()
    domains = list(dict.fromkeys([*cfg.task_domains, cfg.probe_domain]))
    sets = load_validation_sets(layout, domains, cfg.eval_items, tokenizer)
    points = []
    for alpha in sorted(cfg.alphas):
        interpolate_(model, final_state, base_state, alpha)
        scores = evaluate_domains(model, tokenizer, sets)
        task = [scores[d]["exact_match"] or 0.0 for d in cfg.task_domains]
        point = CurvePoint(alpha, sum(task) / len(task), scores[cfg.probe_domain]["loss"], scores)
        log.info("wise_ft alpha %.2f: validation task exact match %.3f, probe loss %.4f", alpha,
                 point.task_exact_match, point.probe_loss)  # fmt: skip
        points.append(point)
    return select_alpha(points, cfg.min_gain_kept)


def _lineage_record(stats: dict) -> dict:
    if stats["method"] == "adamerging":
        return {"method": "adamerging", **{k: stats[k] for k in ADAMERGING_RECORD}}
    if "wise_ft" in stats:
        return {"method": "wise_ft", **{k: v for k, v in stats["wise_ft"].items() if k != "curve"}}
    return {k: stats[k] for k in ("method", "weights", "density", "t", "seed")}


def run(params: Params, layout: Layout) -> StageResult:
    cfg = params.merge
    root = layout.root
    base_dir: Path | None = None
    if cfg.method == "checkpoint_average":
        # The last K complete checkpoints of one training run, averaged uniformly; config and
        # tokenizer come from that stage's finished model.
        stage = cfg.models[0]
        inputs = last_checkpoints(root, stage, cfg.last_k)
        weights = [1.0] * len(inputs)
        files_from = layout.model(stage)
        verify_model_folder(files_from)
    else:
        inputs = [layout.model(stage) for stage in cfg.models]
        for folder in inputs:
            verify_model_folder(folder)  # a flipped byte fails here, with both hashes shown
        weights = list(cfg.weights) if cfg.weights is not None else [1.0] * len(inputs)
        if cfg.method in NEEDS_BASE:
            base_dir = layout.model(cfg.base)  # config validation guarantees base is set here
            verify_model_folder(base_dir)
        check_same_line([*inputs, *([base_dir] if base_dir else [])], root)
        files_from = inputs[0]
        if cfg.method == "wise_ft":
            # alpha chosen on validation items now; the weights of the linear merge written below.
            started = time.perf_counter()
            choice = wise_ft_curve(params, layout, inputs[0], inputs[1])
            choice["seconds"] = round(time.perf_counter() - started, 2)
            weights = [choice["alpha"], 1.0 - choice["alpha"]]

    # One chat template across the merged models (and the files_from folder whose tokenizer is copied).
    template = chat_template.folder_fingerprint(files_from)
    for folder in {*inputs, *([base_dir] if base_dir else [])} - {files_from}:
        if (folder / "tokenizer_config.json").is_file():
            chat_template.check_same_template(
                chat_template.folder_fingerprint(folder), template, child_name=str(folder), parent_name=str(files_from)
            )

    final = layout.model("merge")
    with atomic_output_dir(final) as tmp:
        if cfg.method == "adamerging":
            stats = adamerging_merge(params, layout, inputs, base_dir, tmp)
            weights = stats["mean_coefficient_per_model"]
        else:
            stats = merge_models(
                inputs,
                tmp,
                method="linear" if cfg.method == "wise_ft" else cfg.method,
                weights=weights,
                base_dir=base_dir,
                density=cfg.density,
                t=cfg.t,
                seed=cfg.seed,
                files_from=files_from,
            )
        if cfg.method == "wise_ft":
            stats["wise_ft"] = choice
        parents = [parent_entry(folder, root, weight=w) for folder, w in zip(inputs, weights, strict=True)]
        if base_dir is not None:
            parents.append({**parent_entry(base_dir, root), "role": "base"})
        record = write_lineage(
            tmp,
            stage="merge",
            root=root,
            parents=parents,
            params=cfg.model_dump(mode="json"),
            params_hash=params_hash(cfg),
            seed=cfg.seed,
            extra={"merge": _lineage_record(stats), chat_template.LINEAGE_KEY: template},
        )
    if cfg.method == "checkpoint_average":
        names = [f"{cfg.models[0]}/{folder.name}" for folder in inputs]
    else:
        names = list(cfg.models)
    metrics = {
        "method": cfg.method,
        "inputs": names,
        "weights": dict(zip(names, weights, strict=True)),
        "seconds": stats["seconds"],
        "content_hash": record["content_hash"],
    }
    flat: dict[str, float] = {"seconds": stats["seconds"]}
    if cfg.method == "adamerging":
        metrics["adamerging"] = {k: stats[k] for k in ADAMERGING_RECORD + ("entropy_curve",)}
        flat.update({"entropy_before": stats["entropy_before"], "entropy_after": stats["entropy_after"]})
        flat.update({f"coefficient.{n}": w for n, w in metrics["weights"].items()})
    else:
        metrics.update({k: stats[k] for k in ("tensors", "parameters")})
        metrics["l2_distance_to_inputs"] = dict(zip(names, stats["l2_distance_to_inputs"], strict=True))
        flat.update({"tensors": stats["tensors"], "parameters": stats["parameters"]})
        flat.update({f"l2_distance_to_inputs.{n}": d for n, d in metrics["l2_distance_to_inputs"].items()})
    artifacts = [layout.metrics("merge")]
    if cfg.method == "wise_ft":
        metrics["wise_ft"] = choice
        flat.update({"wise_ft.alpha": choice["alpha"], "wise_ft.validation_gain": choice["validation_gain"]})
        artifacts += plot_tradeoff({"validation": choice["curve"]}, layout.plots / "merge_wise_ft.png",
                                   chosen={"validation": choice["alpha"]})  # fmt: skip
    write_json_atomic(layout.metrics("merge"), metrics)
    log.info("merge: %s of %s written to %s in %.1f s", cfg.method, names, final, stats["seconds"])
    return StageResult(metrics=flat, model_dir=final, artifacts=artifacts)


if __name__ == "__main__":
    stage_main("merge", run)
