"""Evaluation plots (PNG) and the data behind them (JSON/CSV for `dvc plots`).

- `eval_scores`: exact match per stage per domain with confidence-interval bars.
- `forgetting`: the stage x domain forgetting matrix as a heat map.
- `seeds_plot`: mean +- std over a seed sweep per stage per domain, each seed as a dot.
- `stability_gap`: the training stages' continual-evaluation series laid end to end along the
  pipeline, so the dip right after each stage starts (the stability gap) and the recovery show.

matplotlib is imported inside the functions (Agg backend: no display on servers).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain.io import write_json_atomic
from posttrain.scoring.report import EvalReport


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def score_rows(report: EvalReport) -> list[dict[str, Any]]:
    """One row per (stage, domain) with exact match and its CI; `model_domain` is a unique label."""
    rows = []
    for stage in report.stages:
        scores = report.exact_match(stage)
        for domain in report.domains:
            em = scores.get(domain)
            if em is None:
                continue
            rows.append(
                {
                    "model_domain": f"{stage}/{domain}",
                    "stage": stage,
                    "domain": domain,
                    "exact_match": em.mean,
                    "ci_low": em.ci_low,
                    "ci_high": em.ci_high,
                    "n": em.n,
                }
            )
    return rows


def plot_scores(report: EvalReport, folder: Path) -> list[Path]:
    import numpy as np

    rows = score_rows(report)
    data = folder / "eval_scores.csv"
    _write_csv(data, rows, ["model_domain", "stage", "domain", "exact_match", "ci_low", "ci_high", "n"])
    plt = _pyplot()
    stages, domains = report.stages, report.domains
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(domains) + 2), 4))
    width = 0.8 / max(1, len(stages))
    for i, stage in enumerate(stages):
        xs, ys, lo, hi = [], [], [], []
        for j, domain in enumerate(domains):
            row = next((r for r in rows if r["stage"] == stage and r["domain"] == domain), None)
            if row:
                xs.append(j + (i - (len(stages) - 1) / 2) * width)
                ys.append(row["exact_match"])
                lo.append(row["exact_match"] - row["ci_low"])
                hi.append(row["ci_high"] - row["exact_match"])
        if xs:
            ax.bar(xs, ys, width=width, yerr=np.array([lo, hi]), capsize=2, label=stage)
    ax.set_xticks(range(len(domains)), domains)
    ax.set(
        ylabel="greedy exact match",
        ylim=(0, 1.05),
        title=f"Exact match per stage ({report.bootstrap[1]:.0%} CI)",
    )
    ax.legend(fontsize="small", ncol=min(len(stages), 6))
    fig.tight_layout()
    png = folder / "eval_scores.png"
    _save(fig, png)
    plt.close(fig)
    return [png, data]


def plot_forgetting(report: EvalReport, folder: Path) -> list[Path]:
    import numpy as np

    stages, domains = report.stages, report.domains
    table = {stage: report.models[stage].forgetting for stage in stages if stage in report.models}
    rows = []
    grid = np.full((len(stages), len(domains)), np.nan)
    for i, stage in enumerate(stages):
        for j, domain in enumerate(domains):
            value = table.get(stage, {}).get(domain)
            if value:
                grid[i, j] = value["value"]
                rows.append({"model_domain": f"{stage}/{domain}", "stage": stage, "domain": domain, **value})
    data = folder / "forgetting.json"
    write_json_atomic(data, rows)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(domains) + 2), max(3, 0.5 * len(stages) + 1.5)))
    bound = max(0.05, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    for i in range(len(stages)):
        for j in range(len(domains)):
            text = "–" if np.isnan(grid[i, j]) else f"{grid[i, j]:+.2f}"
            dark = not np.isnan(grid[i, j]) and abs(grid[i, j]) > 0.6 * bound
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(stages)), stages)
    ax.set_title("Forgetting (best earlier − current exact match)\nred = forgotten", fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    png = folder / "forgetting.png"
    _save(fig, png)
    plt.close(fig)
    return [png, data]


def stability_gap_rows(series_by_stage: dict[str, list[dict[str, Any]]], stages: Sequence[str]) -> list[dict[str, Any]]:
    """Continual-evaluation rows (`step`, `domain`, `loss`, `exact_match`) of each training stage,
    placed end to end: `pipeline_step` = the stage's step + the steps of the stages before it."""
    rows: list[dict[str, Any]] = []
    offset = 0
    for stage in stages:
        series = series_by_stage.get(stage) or []
        if not series:
            continue
        for row in sorted(series, key=lambda r: (r["step"], r["domain"])):
            rows.append(
                {
                    "stage": stage,
                    "step": int(row["step"]),
                    "pipeline_step": offset + int(row["step"]),
                    "domain": row["domain"],
                    "loss": row.get("loss"),
                    "exact_match": row.get("exact_match"),
                }
            )
        offset += max(int(r["step"]) for r in series)
    return rows


def plot_stability_gap(
    series_by_stage: dict[str, list[dict[str, Any]]], stages: Sequence[str], folder: Path
) -> list[Path]:
    rows = stability_gap_rows(series_by_stage, stages)
    # Written even without rows: dvc.yaml declares these plots, and a recipe with continual
    # evaluation off everywhere must still produce them (empty, saying why).
    data = folder / "stability_gap.csv"
    _write_csv(data, rows, ["stage", "step", "pipeline_step", "domain", "loss", "exact_match"])
    plt = _pyplot()
    fig, (ax_em, ax_loss) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for domain in sorted({r["domain"] for r in rows}):
        mine = [r for r in rows if r["domain"] == domain]
        em = [(r["pipeline_step"], r["exact_match"]) for r in mine if r["exact_match"] is not None]
        if em:
            ax_em.plot(*zip(*em, strict=True), marker=".", label=domain)
        loss = [(r["pipeline_step"], r["loss"]) for r in mine if r["loss"] is not None]
        if loss:
            ax_loss.plot(*zip(*loss, strict=True), marker=".", label=domain)
    # A dashed line where each stage starts: the stability gap is the dip just after it.
    for stage in dict.fromkeys(r["stage"] for r in rows):
        start = min(r["pipeline_step"] - r["step"] for r in rows if r["stage"] == stage)
        for ax in (ax_em, ax_loss):
            ax.axvline(start, color="grey", linestyle="--", linewidth=0.8)
        ax_em.text(start, 1.0, f" {stage}", fontsize=8, va="top")
    ax_em.set(ylabel="validation exact match", ylim=(-0.02, 1.05), title="Stability gap along the pipeline")
    ax_loss.set(ylabel="validation loss", xlabel="training step (stages end to end)")
    if rows:
        ax_em.legend(fontsize="small")
    else:
        ax_em.text(
            0.5,
            0.5,
            "no continual evaluation recorded\n(set <stage>.eval_every > 0)",
            ha="center",
            transform=ax_em.transAxes,
        )
    fig.tight_layout()
    png = folder / "stability_gap.png"
    _save(fig, png)
    plt.close(fig)
    return [png, data]


def seeds_plot(summary: Mapping[str, Any], path: Path) -> Path:
    """Mean +- std bars per model x domain, each seed's value as a dot."""
    plt = _pyplot()
    rows = [(stage, domain, cell) for stage, cells in summary["models"].items() for domain, cell in cells.items()]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.28 * len(rows) + 1)))
    for y, (_stage, _domain, cell) in enumerate(rows):
        ax.barh(y, cell["mean"], xerr=cell["std"] or 0.0, color="#9ecae1", capsize=3)
        points = [s["mean"] for s in cell["per_seed"].values()]
        ax.plot(points, [y] * len(points), "o", color="#08519c", markersize=4)
    ax.set_yticks(range(len(rows)), [f"{stage}/{domain}" for stage, domain, _ in rows])
    ax.invert_yaxis()
    ax.set(
        xlim=(-0.02, 1.02),
        xlabel="greedy exact match (bar: mean +- std over seeds; dots: seeds)",
        title=f"{len(summary['seeds'])} seeds: {', '.join(map(str, summary['seeds']))}",
    )
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_tradeoff(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: Path,
    *,
    chosen: Mapping[str, float] | None = None,
    title: str = "WiSE-FT: task exact match against general-chat perplexity",
    x_label: str = "probe perplexity (lower: less forgotten)",
    y_label: str = "task exact match",
) -> list[Path]:
    """One line per curve (e.g. per seed) of (exp(probe_loss), task_exact_match) points labelled by alpha,
    the chosen alpha of each circled; the points as JSON beside the PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, points in curves.items():
        xs = [math.exp(p["probe_loss"]) for p in points]
        ys = [p["task_exact_match"] for p in points]
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        for p, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"{p['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if chosen and chosen.get(label) == p["alpha"]:
                ax.scatter([x], [y], s=160, facecolors="none", edgecolors=line.get_color(), linewidths=2)
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    data = path.with_suffix(".json")
    write_json_atomic(data, {"curves": {k: list(v) for k, v in curves.items()}, "chosen": dict(chosen or {})})
    return [path, data]
