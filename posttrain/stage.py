"""The stage contract: what a stage function takes and returns, and how its metrics are flattened.

Every module in `stages/` exposes `run(params, layout) -> StageResult`; `posttrain.pipeline.entry`
calls it and hands the result to tracking. Kept a leaf (no torch, no MLflow) so the training and
tracking packages can both use it without importing each other or the entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import Params
from posttrain.layout import Layout


@dataclass
class StageResult:
    """What a stage produced, for tracking: its metrics and, for model stages, the model folder."""

    metrics: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None
    artifacts: list[Path] = field(default_factory=list)


StageFunction = Callable[[Params, Layout], StageResult]


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay whole values."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def is_number(value: Any) -> bool:
    """int or float, but not bool (True is an int to Python, not a metric)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a metrics dict under dotted names (`val_after.add.loss`); lists and strings dropped."""
    return {key: value for key, value in flatten(metrics).items() if is_number(value)}
