"""Where a GRPO step's time goes: generation, reward, scoring and update, per optimizer step.

Inside one optimizer step TRL's GRPOTrainer (1.16) does, for a new generation batch:

    generation  `_generate`: prompts tokenized, completions produced by the engine (`generate`,
                `generate_batch` or vLLM; tool calls included), decoded
    reward      `_calculate_rewards`: the reward functions on every completion
    scoring     the rest of `_generate_and_score_completions`: old-policy and reference log-probs
                (forward passes), group advantages, TRL's own logging
    update      the rest of the step: loss forward and backward over the micro-batches, gradient
                clipping, the optimizer step

A step is timed from the Trainer's `on_step_begin` to its `on_optimizer_step` (CUDA synchronised at
both ends), so logging, checkpoint saves and continual evaluation are outside it; update = step -
generation - reward - scoring. A step that reuses buffered completions (`num_iterations` > 1, or
`steps_per_generation` > `gradient_accumulation_steps`) has no generation of its own.

What is kept, per step (`StepTiming.as_row`, metrics.json `rollout_steps`, an MLflow series):

    step, step_seconds, generation_seconds, generated_tokens, completions,
    generation_tokens_per_second, reward_seconds, scoring_seconds, update_seconds

and for the run (`split_summary`, metrics.json `rollout_timing`): the totals, generated tokens/s and
each phase's share of the step time. Generated tokens are the completions' tokens (EOS included;
with tools, only the model's own tokens). The figures are this process's: in a multi-process run,
rank 0's share of the work. Resumed runs report the steps they ran.

TRL has no public hook around these phases (its `profiling_context` reports only to wandb/trackio),
so `timed_trainer` overrides the three private methods and calls them unchanged;
tests/integration/test_generation_engines.py fails when TRL changes their names, parameters or
`_generate`'s return shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from posttrain.training.job import MeasureHook, TrainedRun

log = logging.getLogger(__name__)

PHASES = ("generation", "reward", "scoring", "update")
# `_generate`'s return value in TRL 1.16: (prompt_ids, completion_ids, tool_mask, completions, logprobs,
# extra_fields, images, tool_images). The timing reads completion_ids and tool_mask.
GENERATE_RETURNS = 8
COMPLETION_IDS, TOOL_MASK = 1, 2


@dataclass
class StepTiming:
    """One optimizer step of GRPO: seconds per phase and what the generation produced."""

    step: int
    step_seconds: float
    generation_seconds: float = 0.0
    generated_tokens: int = 0
    completions: int = 0
    reward_seconds: float = 0.0
    scoring_seconds: float = 0.0

    @property
    def update_seconds(self) -> float:
        return max(self.step_seconds - self.generation_seconds - self.reward_seconds - self.scoring_seconds, 0.0)

    @property
    def generation_tokens_per_second(self) -> float | None:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else None

    def as_row(self) -> dict[str, Any]:
        row = {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}
        rate = self.generation_tokens_per_second
        row["generation_tokens_per_second"] = None if rate is None else round(rate, 2)
        row["update_seconds"] = round(self.update_seconds, 6)
        return row


def split_summary(steps: list[StepTiming]) -> dict[str, Any]:
    """Totals over `steps`, generated tokens/s and each phase's share of the step time."""
    total = sum(s.step_seconds for s in steps)
    seconds = {
        "generation": sum(s.generation_seconds for s in steps),
        "reward": sum(s.reward_seconds for s in steps),
        "scoring": sum(s.scoring_seconds for s in steps),
        "update": sum(s.update_seconds for s in steps),
    }
    tokens = sum(s.generated_tokens for s in steps)
    return {
        "steps": len(steps),
        "step_seconds": round(total, 4),
        **{f"{phase}_seconds": round(value, 4) for phase, value in seconds.items()},
        "generated_tokens": tokens,
        "completions": sum(s.completions for s in steps),
        "generation_tokens_per_second": round(tokens / seconds["generation"], 2) if seconds["generation"] else None,
        "share": {phase: round(value / total, 4) if total > 0 else None for phase, value in seconds.items()},
    }


def _synchronize() -> None:
    """Wait for queued CUDA work, so a phase's seconds are its own (a no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class RolloutTiming(TrainerCallback):
    """Collects `StepTiming`s: the callback opens and closes steps, `timed_trainer` adds the phases."""

    def __init__(self) -> None:
        self.steps: list[StepTiming] = []
        self._open: dict[str, float] | None = None
        self._started = 0.0

    def update_seconds(self) -> float | None:
        """Seconds of this run's optimizer updates alone (None before any step): the MFU of GRPO's training
        part (posttrain.training.flops), apart from generation and rewards."""
        return sum(s.update_seconds for s in self.steps) if self.steps else None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as `name` (generation, reward or rollout) of the open step; outside a step, nothing."""
        _synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self._open is not None:
                _synchronize()
                self._open[name] += time.perf_counter() - started

    def add_generated(self, tokens: int, completions: int) -> None:
        if self._open is not None:
            self._open["tokens"] += tokens
            self._open["completions"] += completions

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _synchronize()
        self._open = dict.fromkeys(("generation", "reward", "rollout", "tokens", "completions", "step"), 0.0)
        self._started = time.perf_counter()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._open is not None:
            _synchronize()
            self._open["step"] = time.perf_counter() - self._started

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        acc, self._open = self._open, None
        if acc is None:
            return
        self.steps.append(
            StepTiming(
                step=state.global_step,
                step_seconds=acc["step"],
                generation_seconds=acc["generation"],
                generated_tokens=int(acc["tokens"]),
                completions=int(acc["completions"]),
                reward_seconds=acc["reward"],
                # The rollout holds generation and reward; the rest of it is scoring.
                scoring_seconds=max(acc["rollout"] - acc["generation"] - acc["reward"], 0.0),
            )
        )


def generated_tokens(generate_output: tuple[Any, ...]) -> tuple[int, int]:
    """(generated tokens, completions) from `GRPOTrainer._generate`'s return value (TRL 1.16's shape)."""
    if len(generate_output) != GENERATE_RETURNS:
        raise TypeError(
            f"GRPOTrainer._generate returned {len(generate_output)} values, expected {GENERATE_RETURNS} (TRL 1.16); "
            "posttrain.training.rollout_timing must follow TRL's new shape"
        )
    completion_ids, tool_mask = generate_output[COMPLETION_IDS], generate_output[TOOL_MASK]
    if tool_mask is not None:  # tool results are in completion_ids but were not generated
        return int(sum(sum(mask) for mask in tool_mask)), len(completion_ids)
    return sum(len(ids) for ids in completion_ids), len(completion_ids)


def timed_trainer(base: type) -> type:
    """A subclass of GRPOTrainer `base` that times its phases into `rollout_timing=` (a RolloutTiming)."""

    class TimedTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, rollout_timing: RolloutTiming, **kwargs: Any) -> None:
            self.rollout_timing = rollout_timing
            super().__init__(*args, **kwargs)
            self.add_callback(rollout_timing)

        # The three overrides below wrap private TRL methods (see the module docstring for why) and
        # change nothing they compute.
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            with self.rollout_timing.phase("rollout"):
                return super()._generate_and_score_completions(inputs)

        def _generate(self, prompts: list[Any]) -> Any:
            with self.rollout_timing.phase("generation"):
                output = super()._generate(prompts)
            self.rollout_timing.add_generated(*generated_tokens(output))
            return output

        def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Any:
            with self.rollout_timing.phase("reward"):
                return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    TimedTrainer.__name__ = TimedTrainer.__qualname__ = f"Timed{base.__name__}"
    return TimedTrainer


def describe(summary: dict[str, Any]) -> str:
    """One line: each phase's share of the step time and the generation rate."""
    share = summary["share"]
    parts = [f"{phase} {share[phase]:.0%}" for phase in PHASES if share[phase] is not None]
    rate = summary["generation_tokens_per_second"]
    return ", ".join(parts) + (f"; generation {rate:.0f} tokens/s" if rate is not None else "")


def timing_hook(timing: RolloutTiming, stage: str, engine: str) -> MeasureHook:
    """After training: the per-step rows (`rollout_steps`) and the split (`rollout_timing`) for metrics.json."""

    def measure(run: TrainedRun) -> dict[str, Any]:
        summary = {"engine": engine, **split_summary(timing.steps)}
        if timing.steps:
            log.info("%s: step time split over %d steps: %s", stage, len(timing.steps), describe(summary))
        return {"rollout_timing": summary, "rollout_steps": [s.as_row() for s in timing.steps]}

    return measure
