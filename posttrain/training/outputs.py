"""What a trainer stage leaves behind: the model folder (atomically, lineage last), metrics JSON, plots."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import Params, params_hash
from posttrain.io import atomic_output_dir, write_json_atomic
from posttrain.layout import Layout
from posttrain.lineage import write_lineage
from posttrain.models import chat_template
from posttrain.models.loading import save_stage_model
from posttrain.stage import StageResult, flat_metrics

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from posttrain.models.lora import AdapterSetup

log = logging.getLogger(__name__)


def write_model_output(
    stage: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    params: Params,
    layout: Layout,
    section: Any,
    parents: list[dict[str, Any]],
    data_manifest: Path | None,
    metrics: dict[str, Any],
    lineage_extra: dict[str, Any] | None = None,
    adapter: AdapterSetup | None = None,
    state_dict: dict[str, Any] | None = None,
    artifacts: list[Path] | None = None,
) -> StageResult:
    """Model folder (atomically, lineage last), then metrics JSON, then plots of the eval series.

    With an `adapter`, the folder is the merged model or the adapter itself (its `lora.handoff`).
    `artifacts`: further files the stage wrote (recorded with the run).
    """
    final = layout.model(stage)
    # One chat template per pipeline: the output's must be its parents' (refused naming both).
    template = chat_template.check_against_lineage(tokenizer, {"parents": parents}, f"the {stage} model")
    lineage_extra = {**(lineage_extra or {}), chat_template.LINEAGE_KEY: template}
    with atomic_output_dir(final) as tmp:
        adapter_record = save_stage_model(model, tokenizer, tmp, adapter=adapter, final=final, state_dict=state_dict)
        if adapter_record is not None:
            lineage_extra = {**(lineage_extra or {}), "adapter": adapter_record}
        record = write_lineage(
            tmp,
            stage=stage,
            root=layout.root,
            parents=parents,
            params=section.model_dump(mode="json"),
            params_hash=params_hash(section),
            seed=params.stage_seed(stage),
            data_manifest=data_manifest,
            extra=lineage_extra,
        )
    metrics = {**metrics, "content_hash": record["content_hash"]}
    write_json_atomic(layout.metrics(stage), metrics)
    artifacts = [
        layout.metrics(stage),
        *write_eval_plot(stage, metrics.get("continual_eval") or [], layout),
        *(artifacts or []),
    ]
    log.info("%s: model written to %s", stage, final)
    return StageResult(metrics=flat_metrics(metrics), model_dir=final, artifacts=artifacts)


def pyplot() -> Any | None:
    """matplotlib's pyplot (Agg backend), or None where matplotlib is not installed: a lean GPU machine
    (docs/gpu.md) trains without it; the plot's JSON rows are still written, only the PNG is skipped."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: plot images skipped (their JSON rows are written)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_eval_plot(stage: str, series: list[dict[str, Any]], layout: Layout) -> list[Path]:
    """PNG of validation loss and exact match per domain over steps, plus the rows as JSON for `dvc plots`."""
    if not series:
        return []
    data_path = layout.plots / f"{stage}_continual_eval.json"
    write_json_atomic(data_path, series)
    plt = pyplot()
    if plt is None:
        return [data_path]
    domains = sorted({row["domain"] for row in series})
    fig, (ax_loss, ax_em) = plt.subplots(1, 2, figsize=(10, 4))
    for domain in domains:
        rows = sorted((r for r in series if r["domain"] == domain), key=lambda r: r["step"])
        ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", label=domain)
        em = [(r["step"], r["exact_match"]) for r in rows if r["exact_match"] is not None]
        if em:
            ax_em.plot(*zip(*em, strict=False), marker="o", label=domain)
    ax_loss.set(title=f"{stage}: validation loss", xlabel="step", ylabel="loss per token")
    ax_em.set(title=f"{stage}: greedy exact match", xlabel="step", ylabel="exact match", ylim=(-0.02, 1.02))
    ax_loss.legend()
    ax_em.legend()
    fig.tight_layout()
    png_path = layout.plots / f"{stage}_continual_eval.png"
    tmp = png_path.with_name(f".{png_path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return [png_path, data_path]


def write_proportions_plot(name: str, title: str, history: list[dict[str, Any]], layout: Layout) -> list[Path]:
    """PNG of sampling proportions over steps (`history`: [{step, p: {arm: proportion}}]) and the rows as
    JSON, as `<name>.png` / `<name>.json` under artifacts/plots (curriculum arms, online mixture weights)."""
    if not history:
        return []
    data_path = layout.plots / f"{name}.json"
    write_json_atomic(data_path, history)
    plt = pyplot()
    if plt is None:
        return [data_path]
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in sorted(history[0]["p"]):
        ax.plot([r["step"] for r in history], [r["p"][arm] for r in history], label=arm)
    ax.set(title=title, xlabel="step", ylabel="proportion", ylim=(-0.02, 1.02))
    ax.legend(fontsize="small")
    fig.tight_layout()
    png_path = layout.plots / f"{name}.png"
    tmp = png_path.with_name(f".{png_path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return [png_path, data_path]
