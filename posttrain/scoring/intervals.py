"""Bootstrap confidence intervals over test items (numpy only): the evaluate stage's intervals and the
promotion rules' paired comparisons use the same resampling, so a comparison is paired when both scores
were taken on the same items with the same seed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def bootstrap_indices(n_items: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n_items) resampled item indices. Sharing them across models makes comparisons paired."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_items, size=(samples, n_items))


def percentile_ci(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(estimates, [alpha, 1.0 - alpha])
    return float(low), float(high)


def mean_ci(values: Sequence[float], *, samples: int, confidence: float, seed: int) -> dict[str, Any]:
    """Mean with a percentile-bootstrap confidence interval over items."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    idx = bootstrap_indices(x.size, samples, seed)
    low, high = percentile_ci(x[idx].mean(axis=1), confidence)
    return {"mean": float(x.mean()), "ci_low": low, "ci_high": high, "n": int(x.size)}


def ratio_ci(
    num: Sequence[float], den: Sequence[float], *, samples: int, confidence: float, seed: int
) -> dict[str, Any]:
    """sum(num)/sum(den) (token-weighted loss) with a bootstrap CI over items."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if a.size == 0 or b.sum() <= 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": int(a.size), "tokens": int(b.sum())}
    idx = bootstrap_indices(a.size, samples, seed)
    low, high = percentile_ci(a[idx].sum(axis=1) / np.maximum(b[idx].sum(axis=1), 1), confidence)
    return {"mean": float(a.sum() / b.sum()), "ci_low": low, "ci_high": high, "n": int(a.size), "tokens": int(b.sum())}
