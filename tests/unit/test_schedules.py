"""Shapes of the learning-rate schedules: values at phase borders, monotonic phases, the floor."""

from __future__ import annotations

import pytest

from posttrain.config import ScheduleConfig
from posttrain.training.schedules import SCHEDULES, build_scheduler, lr_multiplier

TOTAL = 100
FLOOR = 0.1


def cfg(name: str, **kw: float) -> ScheduleConfig:
    base = dict(warmup_fraction=0.1, decay_fraction=0.2, cooldown_fraction=0.2, constant_ratio=0.5, min_lr_ratio=FLOOR)
    base.update(kw)
    return ScheduleConfig(name=name, **base)


def curve(c: ScheduleConfig) -> list[float]:
    return [lr_multiplier(step, TOTAL, c) for step in range(TOTAL)]


def non_increasing(values: list[float]) -> bool:
    return all(b <= a + 1e-12 for a, b in zip(values, values[1:], strict=False))


def strictly_increasing(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_warmup_rises_to_peak_and_floor_holds(name):
    values = curve(cfg(name))
    assert values[0] == pytest.approx(0.1)  # first of 10 warm-up steps
    assert strictly_increasing(values[:10])
    assert values[9] == pytest.approx(1.0)
    assert max(values) == pytest.approx(1.0)
    assert min(values[10:]) >= FLOOR - 1e-12


def test_cosine():
    values = curve(cfg("cosine"))
    assert values[10] == pytest.approx(1.0)
    assert non_increasing(values[10:])
    # Halfway through the decay: halfway between peak and floor.
    assert values[55] == pytest.approx(FLOOR + (1 - FLOOR) * 0.5)
    assert values[99] == pytest.approx(FLOOR, abs=0.01)


def test_cosine_without_warmup_starts_at_peak():
    # CPT re-warming is the warm-up; without one the schedule starts at the peak.
    values = curve(cfg("cosine", warmup_fraction=0.0))
    assert values[0] == pytest.approx(1.0)


def test_linear():
    values = curve(cfg("linear"))
    assert non_increasing(values[10:])
    diffs = {round(a - b, 9) for a, b in zip(values[10:], values[11:], strict=False)}
    assert len(diffs) == 1  # a straight line
    assert values[55] == pytest.approx(FLOOR + (1 - FLOOR) * 0.5)


def test_constant():
    values = curve(cfg("constant"))
    assert values[10:] == [1.0] * 90


def test_wsd_stable_then_linear_decay_to_floor():
    values = curve(cfg("wsd"))
    assert values[10:80] == [1.0] * 70
    assert strictly_increasing(values[80:][::-1])
    assert values[99] == pytest.approx(FLOOR)
    assert values[89] == pytest.approx(FLOOR + (1 - FLOOR) * 0.5)


def test_constant_cooldown_is_sqrt_shaped():
    cooldown, wsd = curve(cfg("constant_cooldown")), curve(cfg("wsd"))
    assert cooldown[10:80] == [1.0] * 70
    assert strictly_increasing(cooldown[80:][::-1])
    assert cooldown[99] == pytest.approx(FLOOR)
    # 1 - sqrt(p) drops faster than 1 - p early in the cool-down.
    assert all(c < w for c, w in zip(cooldown[80:99], wsd[80:99], strict=False))


def test_infinite_cooldown_constant_anneal():
    values = curve(cfg("infinite"))
    assert non_increasing(values[10:30])
    assert values[29] == pytest.approx(0.5)  # cool-down ends at constant_ratio
    assert values[30:80] == [0.5] * 50
    assert strictly_increasing(values[80:][::-1])
    assert values[99] == pytest.approx(FLOOR)


def test_phases_that_do_not_fit_are_rejected():
    with pytest.raises(ValueError, match="add up to"):
        ScheduleConfig(name="infinite", warmup_fraction=0.5, decay_fraction=0.3, cooldown_fraction=0.3)


def test_build_scheduler_drives_the_optimizer_and_restores_position():
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    c = cfg("wsd")
    scheduler = build_scheduler(optimizer, c, TOTAL)
    seen = []
    for _ in range(85):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([2.0 * lr_multiplier(s, TOTAL, c) for s in range(85)])
    # A checkpoint's state restores the position in the schedule.
    state = scheduler.state_dict()
    optimizer2 = torch.optim.SGD([param], lr=2.0)
    scheduler2 = build_scheduler(optimizer2, c, TOTAL)
    scheduler2.load_state_dict(state)
    optimizer2.param_groups[0]["lr"] = scheduler2.get_last_lr()[0]
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(2.0 * lr_multiplier(85, TOTAL, c))
