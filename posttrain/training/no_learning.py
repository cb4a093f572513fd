"""A stage that cannot learn, or did not, says so, and stops where the recipe asks (`<stage>.no_learning`).

Issue 26 tried a held-out base model: GRPO measured 91% of its held-out prompt groups with zero reward
variance before training (no advantage, no gradient), trained 8 steps and wrote weights bit-identical to
its parent's, and reported success. The checks:

    zero_variance_groups  before GRPO trains: share of held-out prompts whose sampled completions all get
                          the same reward (`grpo.no_learning.max_zero_variance_groups`)
    unchanged_weights     after training: the trained weights have the input model's digest
    loss_change           after training: |first - last| / |first| of the training loss, below
                          `min_loss_change` (means of up to 3 logged losses at each end)

Each is recorded in the stage's metrics.json under `no_learning` (value, threshold, triggered). A
triggered check logs a warning (`action: warn`) or raises StageError before anything is written
(`action: fail`); a check before training fails before any step is spent.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from posttrain.config import GRPONoLearningConfig, NoLearningConfig
from posttrain.errors import StageError

log = logging.getLogger(__name__)

LOSS_WINDOW = 3  # logged losses averaged at each end of the run


@dataclass(frozen=True)
class Check:
    """One measurement of whether a stage can learn or learned; `triggered` when it says it did not."""

    name: str
    value: float | bool | None
    threshold: float | bool | None
    triggered: bool
    detail: str


def weights_digest(model: Any) -> str:
    """sha256 over the trainable parameters' bytes, in name order (equal digests: bit-identical weights)."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    return digest.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


def loss_change(losses: Sequence[float]) -> float | None:
    """|mean of the first logged losses - mean of the last| / |the first mean| (None: fewer than 2 logs)."""
    if len(losses) < 2:
        return None
    window = max(1, min(LOSS_WINDOW, len(losses) // 2))
    first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
    return abs(first - last) / max(abs(first), 1e-12)


def zero_variance_check(cfg: GRPONoLearningConfig, share: float, groups: int) -> Check:
    """Before GRPO trains: the share of held-out prompt groups whose completions all scored the same."""
    limit = cfg.max_zero_variance_groups
    triggered = limit is not None and share > limit
    return Check(
        name="zero_variance_groups",
        value=share,
        threshold=limit,
        triggered=triggered,
        detail=f"{share:.0%} of {groups} held-out prompt groups have zero reward variance before training "
        f"(no advantage, no gradient){f'; more than {limit:.0%}' if triggered else ''}",
    )


def after_training_checks(
    cfg: NoLearningConfig, losses: Sequence[float], digest_before: str | None, digest_after: str | None
) -> list[Check]:
    """The checks on a finished run: unchanged weights, a loss that did not move."""
    checks = []
    if cfg.unchanged_weights and digest_before is not None:
        same = digest_before == digest_after
        checks.append(
            Check(
                name="unchanged_weights",
                value=same,
                threshold=True,
                triggered=same,
                detail="the trained weights are bit-identical to the input model's"
                if same
                else "the trained weights differ from the input model's",
            )
        )
    change = loss_change(losses)
    if cfg.min_loss_change is not None:
        triggered = change is not None and change < cfg.min_loss_change
        shown = "not measured (fewer than 2 logged losses)" if change is None else f"{change:.2%}"
        checks.append(
            Check(
                name="loss_change",
                value=change,
                threshold=cfg.min_loss_change,
                triggered=triggered,
                detail=f"training loss moved {shown} from the first to the last logs"
                + (f", less than {cfg.min_loss_change:.2%}" if triggered else ""),
            )
        )
    return checks


def enforce(
    stage: str, cfg: NoLearningConfig, checks: Sequence[Check], earlier: Sequence[Check] = ()
) -> dict[str, Any]:
    """Warn about (action warn) or stop the stage on (action fail) each triggered check of `checks`; returns
    the `no_learning` record for metrics.json, which also holds the `earlier` checks (enforced before)."""
    new = [c for c in checks if c.triggered]
    for check in new:
        log.warning("%s did not learn: %s (%s.no_learning, action %s)", stage, check.detail, stage, cfg.action)
    if new and cfg.action == "fail":
        shown = "; ".join(f"{c.name}: {c.detail}" for c in new)
        raise StageError(
            f"stage {stage}: learned nothing: {shown}; no model written. Expected the stage to change the model "
            f"(see docs/real-model.md, 'A stage that learned nothing'); set {stage}.no_learning.action: warn to "
            "write the model anyway"
        )
    every = [*earlier, *checks]
    return {
        "action": cfg.action,
        "triggered": [c.name for c in every if c.triggered],
        "checks": {c.name: asdict(c) for c in every},
    }
