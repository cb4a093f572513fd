"""The GRPO stage's optional trainer behaviours, assembled in one place.

`grpo.curriculum` (a UCB bandit over domains or difficulty buckets picks each batch's prompts,
posttrain.training.curriculum) and `grpo.hybrid` (prompts whose rollouts fail are trained with SFT on
their gold answer, posttrain.training.hybrid) each wrap the trainer class, add constructor arguments
and a measure hook that writes their trajectory into the stage's metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain.config import GRPOStageConfig
from posttrain.layout import Layout
from posttrain.training.curriculum import UCBCurriculum, arm_of, curriculum_hook, curriculum_trainer
from posttrain.training.hybrid import hybrid_hook, hybrid_trainer


def with_options(
    trainer_cls: type, section: GRPOStageConfig, rows: Sequence[dict[str, Any]], layout: Layout, stage: str
) -> tuple[type, dict[str, Any], list[Any]]:
    """(trainer class, extra trainer kwargs, extra measure hooks) for the options `section` turns on."""
    kwargs: dict[str, Any] = {}
    hooks: list[Any] = []
    if section.curriculum is not None:
        arms = section.curriculum.arms
        curriculum = UCBCurriculum([arm_of(row, arms) for row in rows], section.curriculum)
        trainer_cls = curriculum_trainer(trainer_cls)
        kwargs |= {"curriculum": curriculum, "arm_key": lambda row: arm_of(row, arms)}
        hooks.append(curriculum_hook(curriculum, [row["id"] for row in rows], layout, stage))
    if section.hybrid is not None:
        trainer_cls = hybrid_trainer(trainer_cls)
        kwargs["hybrid"] = section.hybrid
        hooks.append(hybrid_hook())
    return trainer_cls, kwargs, hooks
