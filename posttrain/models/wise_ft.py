"""WiSE-FT: interpolate a fine-tuned model with its base, the interpolation weight chosen on validation data.

theta(alpha) = alpha * theta_final + (1 - alpha) * theta_base (Wortsman et al., "Robust fine-tuning of
zero-shot models", 2022). alpha = 1 is the final model and alpha = 0 the base. In between, a fine-tuned
model often keeps most of its task gain while getting back much of what it forgot.

The merge stage scores each alpha of `merge.wise_ft.alphas` on validation items only. Task exact match
is taken on `task_domains` and the loss on `probe_domain`. `select_alpha` then picks the alpha with the
lowest probe loss among those that keep at least `min_gain_kept` of the final model's validation gain
over the base. The test split never enters the choice: it is scored afterwards by the evaluate stage,
like every other model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class CurvePoint:
    """One alpha of the curve: validation task exact match (mean over the task domains) and probe loss."""

    alpha: float
    task_exact_match: float
    probe_loss: float
    per_domain: Mapping[str, Any]


def select_alpha(points: Sequence[CurvePoint], min_gain_kept: float) -> dict[str, Any]:
    """The chosen point, and why: the lowest probe loss among the alphas keeping `min_gain_kept` of the gain.

    The gain is the final model's (alpha 1) task exact match minus the base's (alpha 0). When the final
    model gained nothing on validation, no gain has to be kept: every alpha is eligible. Ties in probe
    loss go to the larger alpha (closer to the model that was trained).
    """
    by_alpha = {p.alpha: p for p in points}
    if 0.0 not in by_alpha or 1.0 not in by_alpha:
        raise ValueError(f"the curve needs alpha 0 and alpha 1; got {sorted(by_alpha)}")
    base, final = by_alpha[0.0], by_alpha[1.0]
    gain = final.task_exact_match - base.task_exact_match
    if gain > 0:
        eligible = [p for p in points if p.task_exact_match - base.task_exact_match >= min_gain_kept * gain]
    else:
        eligible = list(points)
    chosen = min(eligible, key=lambda p: (p.probe_loss, -p.alpha))
    kept = (chosen.task_exact_match - base.task_exact_match) / gain if gain > 0 else None
    return {
        "alpha": chosen.alpha,
        "validation_gain": gain,
        "gain_kept": kept,
        "eligible_alphas": sorted(p.alpha for p in eligible),
        "rule": f"lowest probe loss among alphas keeping >= {min_gain_kept:g} of the validation gain"
        + ("" if gain > 0 else " (no validation gain: every alpha eligible)"),
        "curve": [asdict(p) for p in sorted(points, key=lambda p: p.alpha)],
    }


def interpolate_(model: Any, final: Mapping[str, Any], base: Mapping[str, Any], alpha: float) -> None:
    """Set `model`'s parameters to alpha * final + (1 - alpha) * base in place (state dicts by name)."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(final[name] * alpha + base[name] * (1.0 - alpha))
