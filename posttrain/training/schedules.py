"""Learning-rate schedules as multipliers of the peak learning rate.

Each shape is a plain function `(step, total_steps, cfg) -> multiplier in [0, 1]`, so it can be
unit-tested and plotted without a trainer. `build_scheduler` wraps one in a torch `LambdaLR`;
`posttrain.training.with_schedule` hands that to any TRL/transformers Trainer (it overrides
`Trainer.create_scheduler`, so the Trainer still creates the optimizer itself and still saves and
restores the scheduler state in checkpoints).

Shapes (w = warmup steps, d = final-decay steps, c = cool-down steps, floor = min_lr_ratio):

    cosine             linear warm-up to 1, cosine decay to floor
                       (in CPT the warm-up is a re-warming of an already trained model)
    linear             linear warm-up to 1, linear decay to floor
    constant           linear warm-up to 1, then 1
    wsd                warm-up, stable at 1, linear decay to floor over the last d steps
    constant_cooldown  warm-up, constant at 1, (1 - sqrt) cool-down to floor over the last d steps
                       (the cool-down shape of Hägele et al. 2024, "Scaling laws and compute-optimal
                       training beyond fixed training durations")
    infinite           warm-up, cosine cool-down to constant_ratio over c steps, constant,
                       then a linear anneal to floor over the last d steps (a schedule that can be
                       continued with more data: resume from before the anneal)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from posttrain.config import ScheduleConfig

if TYPE_CHECKING:  # torch is only needed by build_scheduler
    import torch

Schedule = Callable[[int, int, ScheduleConfig], float]


def _phase_steps(fraction: float, total: int) -> int:
    return int(round(fraction * total))


def _warmup(step: int, warmup: int) -> float:
    # (step + 1) / warmup: the first optimizer step already moves the weights, and the peak is
    # reached on the last warm-up step (HF's step / warmup spends step 0 at learning rate 0).
    return min(1.0, (step + 1) / warmup)


def _progress(step: int, start: int, length: int) -> float:
    """Fraction of a phase [start, start + length) done at `step`, clamped to [0, 1]."""
    if length <= 0:
        return 1.0
    return min(1.0, max(0.0, (step - start) / length))


def _between(low: float, high: float, fraction_of_high: float) -> float:
    return low + (high - low) * fraction_of_high


def cosine(step: int, total: int, cfg: ScheduleConfig) -> float:
    warmup = _phase_steps(cfg.warmup_fraction, total)
    if step < warmup:
        return _warmup(step, warmup)
    p = _progress(step, warmup, total - warmup)
    return _between(cfg.min_lr_ratio, 1.0, 0.5 * (1.0 + math.cos(math.pi * p)))


def linear(step: int, total: int, cfg: ScheduleConfig) -> float:
    warmup = _phase_steps(cfg.warmup_fraction, total)
    if step < warmup:
        return _warmup(step, warmup)
    p = _progress(step, warmup, total - warmup)
    return _between(cfg.min_lr_ratio, 1.0, 1.0 - p)


def constant(step: int, total: int, cfg: ScheduleConfig) -> float:
    warmup = _phase_steps(cfg.warmup_fraction, total)
    return _warmup(step, warmup) if step < warmup else 1.0


def _warmup_hold_decay(step: int, total: int, cfg: ScheduleConfig, decay_shape) -> float:
    """Warm up, hold the peak, then decay over the last `decay_fraction` of the steps.

    `decay_shape` maps decay progress p in [0, 1] to the share of the drop taken (p: linear).
    """
    warmup = _phase_steps(cfg.warmup_fraction, total)
    decay = _phase_steps(cfg.decay_fraction, total)
    if step < warmup:
        return _warmup(step, warmup)
    decay_start = total - decay
    if step < decay_start:
        return 1.0
    # +1: the last step (total - 1) lands exactly on the floor.
    p = _progress(step + 1, decay_start, decay)
    return _between(cfg.min_lr_ratio, 1.0, 1.0 - decay_shape(p))


def wsd(step: int, total: int, cfg: ScheduleConfig) -> float:
    return _warmup_hold_decay(step, total, cfg, lambda p: p)


def constant_cooldown(step: int, total: int, cfg: ScheduleConfig) -> float:
    # 1 - sqrt cooldown: drops fast at first, then flattens towards the floor.
    return _warmup_hold_decay(step, total, cfg, math.sqrt)


def infinite(step: int, total: int, cfg: ScheduleConfig) -> float:
    warmup = _phase_steps(cfg.warmup_fraction, total)
    cooldown = _phase_steps(cfg.cooldown_fraction, total)
    decay = _phase_steps(cfg.decay_fraction, total)
    level = max(cfg.constant_ratio, cfg.min_lr_ratio)
    if step < warmup:
        return _warmup(step, warmup)
    if step < warmup + cooldown:
        p = _progress(step + 1, warmup, cooldown)
        return _between(level, 1.0, 0.5 * (1.0 + math.cos(math.pi * p)))
    decay_start = total - decay
    if step < decay_start:
        return level
    p = _progress(step + 1, decay_start, decay)
    return _between(cfg.min_lr_ratio, level, 1.0 - p)


SCHEDULES: dict[str, Schedule] = {
    "cosine": cosine,
    "linear": linear,
    "constant": constant,
    "wsd": wsd,
    "constant_cooldown": constant_cooldown,
    "infinite": infinite,
}


def lr_multiplier(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`."""
    return SCHEDULES[cfg.name](step, max(1, total), cfg)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `cfg` over `total_steps` optimizer steps.

    The lambda is a closure (not a picklable object), so `LambdaLR.state_dict()` stores only the step
    counter: a checkpoint restores the position in the schedule, the shape comes from params.yaml.
    """
    import torch

    def multiplier(step: int) -> float:
        return lr_multiplier(step, total_steps, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
