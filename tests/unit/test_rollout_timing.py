"""GRPO's step split (posttrain.training.rollout_timing): how phases add up into steps and a summary.

The real GRPO run that logs it: tests/integration/test_dpo_grpo.py; TRL's side of the contract:
tests/integration/test_generation_engines.py."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from posttrain.tracking.runs import scalar_metrics, series_metrics
from posttrain.training.rollout_timing import (
    RolloutTiming,
    StepTiming,
    describe,
    generated_tokens,
    split_summary,
)


def test_a_step_is_split_into_generation_reward_scoring_and_update() -> None:
    steps = [
        StepTiming(step=1, step_seconds=10.0, generation_seconds=6.0, generated_tokens=600, completions=8,
                   reward_seconds=0.5, scoring_seconds=1.5),
        StepTiming(step=2, step_seconds=4.0),  # reused buffered completions: no generation of its own
    ]  # fmt: skip
    assert steps[0].update_seconds == pytest.approx(2.0) and steps[1].update_seconds == pytest.approx(4.0)
    assert steps[0].generation_tokens_per_second == pytest.approx(100.0)
    assert steps[1].as_row()["generation_tokens_per_second"] is None
    summary = split_summary(steps)
    assert summary["steps"] == 2 and summary["step_seconds"] == 14.0 and summary["generated_tokens"] == 600
    assert summary["generation_tokens_per_second"] == 100.0
    assert summary["share"] == {"generation": 0.4286, "reward": 0.0357, "scoring": 0.1071, "update": 0.4286}
    assert sum(summary["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert describe(summary) == "generation 43%, reward 4%, scoring 11%, update 43%; generation 100 tokens/s"
    assert split_summary([])["share"]["generation"] is None


def test_the_callback_assembles_steps_from_timed_phases() -> None:
    timing = RolloutTiming()
    state = SimpleNamespace(global_step=0)
    with timing.phase("generation"):  # outside a step (e.g. evaluation): not counted
        pass
    walls = []
    for step in (1, 2):
        began = time.perf_counter()
        timing.on_step_begin(None, state, None)
        with timing.phase("rollout"):
            with timing.phase("generation"):
                time.sleep(0.02)
            timing.add_generated(tokens=12, completions=4)
            with timing.phase("reward"):
                time.sleep(0.01)
            time.sleep(0.01)  # scoring: old/reference log-probs
        time.sleep(0.01)  # update: forward, backward
        timing.on_optimizer_step(None, state, None)
        state.global_step = step
        time.sleep(0.02)  # logging and saving after the optimizer step: outside the step
        timing.on_step_end(None, state, None)
        walls.append(time.perf_counter() - began)
    assert [s.step for s in timing.steps] == [1, 2]
    for s, wall in zip(timing.steps, walls, strict=True):
        assert s.generated_tokens == 12 and s.completions == 4
        assert s.generation_seconds >= 0.02 and s.reward_seconds >= 0.01 and s.scoring_seconds >= 0.01
        assert s.update_seconds >= 0.01
        assert s.step_seconds <= wall - 0.02  # the 0.02 s after on_optimizer_step is not in the step
        assert s.step_seconds == pytest.approx(
            s.generation_seconds + s.reward_seconds + s.scoring_seconds + s.update_seconds
        )


def test_generated_tokens_reads_trl_s_generate_output() -> None:
    completion_ids = [[5, 6, 2], [7, 2]]
    assert generated_tokens((None, completion_ids, None, None, None, {}, None, [])) == (5, 2)
    # With tools, the tool results sit inside completion_ids but were not generated (mask 0).
    assert generated_tokens((None, completion_ids, [[1, 0, 1], [1, 1]], None, None, {}, None, [])) == (4, 2)
    with pytest.raises(TypeError, match="expected 8"):
        generated_tokens((None, completion_ids, None))


def test_rows_go_to_mlflow_as_a_series_and_the_summary_as_scalars() -> None:
    steps = [StepTiming(step=s, step_seconds=2.0, generation_seconds=1.0, generated_tokens=50) for s in (1, 2)]
    metrics = {"rollout_timing": split_summary(steps), "rollout_steps": [s.as_row() for s in steps]}
    points = series_metrics(metrics)
    assert ("rollout_steps/generation_seconds", 1.0, 2) in points
    assert ("rollout_steps/generation_tokens_per_second", 50.0, 1) in points
    scalars = scalar_metrics(metrics)
    assert scalars["rollout_timing.share.generation"] == 0.5
    assert not any(name.startswith("rollout_steps") for name in scalars)
