"""A bandit curriculum for GRPO (DUMP-style UCB): which arm each prompt of the next batch comes from.

Arms are the GRPO mixture's domains, or (domain, difficulty bucket) pairs (`domains.difficulty`:
digits for arithmetic, word length for reverse). A group whose completions all score the same has
zero advantage and teaches nothing, so an arm whose items are saturated (all right) or impossible
(all wrong) scores ~0; an arm of learnable items scores its mean |advantage|. Each arm's score is

    mean |advantage| over its last `window` prompt groups + c * sqrt(ln(N + 1) / (n_arm + 1))

(N: groups seen, n_arm: the arm's groups), and the next batch's prompts are drawn from
softmax(score / temperature). Within an arm, items are taken in a seeded shuffled order, reshuffled
after each pass. Everything is seeded, and the advantages are deterministic on CPU, so a rerun
draws the same prompts in the same order.

The hook on TRL's GRPOTrainer (`curriculum_trainer`): `_get_train_sampler` returns a
`CurriculumSampler` laid out like TRL's RepeatSampler (each prompt `num_generations` times in a row,
each generation batch repeated `num_iterations * steps_per_generation` times), and
`_generate_and_score_completions` feeds each group's mean |advantage| back to its arm. Resuming from
a checkpoint restarts the curriculum's statistics (they are not saved in checkpoints).
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import Sampler

from posttrain.config import CurriculumConfig
from posttrain.data.domains import difficulty
from posttrain.layout import Layout
from posttrain.training.job import MeasureHook, TrainedRun
from posttrain.training.outputs import write_proportions_plot


def arm_of(row: Mapping[str, Any], arms: str) -> str:
    """The arm of a mixture row: its domain, or `domain/bucket` with the item's difficulty bucket."""
    return row["domain"] if arms == "domain" else f"{row['domain']}/{difficulty(row['prompt'])}"


class UCBCurriculum:
    """Arm scores and sampling probabilities; `history` holds the probabilities at each update."""

    def __init__(self, arms: Sequence[str], config: CurriculumConfig) -> None:
        if not arms:
            raise ValueError("a curriculum needs at least one arm")
        self.arms = sorted(set(arms))
        self.config = config
        self.recent: dict[str, deque[float]] = {a: deque(maxlen=config.window) for a in self.arms}
        self.pulls = dict.fromkeys(self.arms, 0)
        self.history: list[dict[str, Any]] = []
        self.drawn: list[int] = []  # dataset index of every prompt drawn, in order (the sampler appends)

    def update(self, arm: str, abs_advantage: float) -> None:
        self.recent[arm].append(abs_advantage)
        self.pulls[arm] += 1

    def scores(self) -> dict[str, float]:
        total = sum(self.pulls.values())
        bonus = {a: self.config.exploration * math.sqrt(math.log(total + 1) / (self.pulls[a] + 1)) for a in self.arms}
        return {a: (statistics.fmean(self.recent[a]) if self.recent[a] else 0.0) + bonus[a] for a in self.arms}

    def probabilities(self) -> dict[str, float]:
        scores = self.scores()
        top = max(scores.values())  # subtracted for a stable softmax
        weights = {a: math.exp((s - top) / self.config.temperature) for a, s in scores.items()}
        total = sum(weights.values())
        return {a: w / total for a, w in weights.items()}

    def record(self, step: int) -> dict[str, float]:
        """Append the current probabilities to `history` (one point per generation batch)."""
        probabilities = self.probabilities()
        self.history.append({"step": step, "p": {a: round(p, 6) for a, p in probabilities.items()}})
        return probabilities


class CurriculumSampler(Sampler[int]):
    """Dataset indices in RepeatSampler's layout, each batch's prompts drawn from the curriculum now."""

    def __init__(
        self,
        curriculum: UCBCurriculum,
        row_arms: Sequence[str],
        *,
        prompts_per_batch: int,
        mini_repeat_count: int,
        repeat_count: int,
        seed: int,
    ) -> None:
        self.curriculum = curriculum
        self.by_arm: dict[str, list[int]] = {a: [] for a in curriculum.arms}
        for index, arm in enumerate(row_arms):
            self.by_arm[arm].append(index)
        self.prompts_per_batch = prompts_per_batch
        self.mini_repeat_count = mini_repeat_count
        self.repeat_count = repeat_count
        self.num_batches = max(len(row_arms) // prompts_per_batch, 1)
        # One rng and one set of queues for the sampler's life: a second epoch continues the stream.
        self.rng = random.Random(f"{seed}:curriculum")
        self.queues: dict[str, list[int]] = {a: [] for a in self.by_arm}

    def __len__(self) -> int:
        return self.num_batches * self.prompts_per_batch * self.mini_repeat_count * self.repeat_count

    def __iter__(self) -> Iterator[int]:
        rng, queues = self.rng, self.queues
        arms = [a for a in self.curriculum.arms if self.by_arm[a]]
        for _ in range(self.num_batches):
            # Read now, not at construction: the trainer updates the curriculum between batches.
            probabilities = self.curriculum.probabilities()
            batch = []
            for arm in rng.choices(arms, weights=[probabilities[a] for a in arms], k=self.prompts_per_batch):
                if not queues[arm]:
                    queues[arm] = rng.sample(self.by_arm[arm], len(self.by_arm[arm]))
                batch.append(queues[arm].pop())
            self.curriculum.drawn.extend(batch)
            for _ in range(self.repeat_count):
                for index in batch:
                    yield from [index] * self.mini_repeat_count


def group_abs_advantages(advantages: Sequence[float], group: int) -> list[float]:
    """Mean |advantage| of each consecutive group of `group` completions (one prompt's rollouts)."""
    return [statistics.fmean(abs(a) for a in advantages[i : i + group]) for i in range(0, len(advantages), group)]


def curriculum_trainer(base: type) -> type:
    """A subclass of GRPOTrainer `base` that samples through a curriculum; construct it with the extra
    keywords `curriculum=` (a UCBCurriculum) and `arm_key=` (row -> arm)."""

    class CurriculumTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(
            self, *args: Any, curriculum: UCBCurriculum, arm_key: Callable[[Mapping[str, Any]], str], **kwargs: Any
        ) -> None:
            self.curriculum = curriculum
            self.arm_key = arm_key
            self.curriculum_sampler: CurriculumSampler | None = None
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, dataset: Any = None) -> Sampler:
            dataset = self.train_dataset if dataset is None else dataset
            self.curriculum_sampler = CurriculumSampler(
                self.curriculum,
                [self.arm_key(row) for row in dataset],
                prompts_per_batch=self.args.generation_batch_size // self.num_generations,
                mini_repeat_count=self.num_generations,
                repeat_count=self.num_iterations * self.args.steps_per_generation,
                seed=self.args.seed,
            )
            return self.curriculum_sampler

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            output = super()._generate_and_score_completions(inputs)
            if self.model.training:
                advantages = output["advantages"].tolist()
                for start, value in zip(
                    range(0, len(inputs), self.num_generations),
                    group_abs_advantages(advantages, self.num_generations),
                    strict=True,
                ):
                    self.curriculum.update(self.arm_key(inputs[start]), value)
                for arm, p in self.curriculum.record(self.state.global_step).items():
                    self._metrics["train"][f"curriculum/p/{arm}"].append(p)
            return output

    CurriculumTrainer.__name__ = CurriculumTrainer.__qualname__ = f"Curriculum{base.__name__}"
    return CurriculumTrainer


def curriculum_hook(curriculum: UCBCurriculum, ids: Sequence[str], layout: Layout, stage: str) -> MeasureHook:
    """After training: the arm probabilities over steps (metrics, JSON + plot) and the prompts drawn, by id."""

    def measure(run: TrainedRun) -> dict[str, Any]:
        run.artifacts += write_proportions_plot(
            f"{stage}_curriculum", f"{stage}: curriculum arm probabilities", curriculum.history, layout
        )
        drawn = [ids[i] for i in curriculum.drawn]
        return {
            "curriculum_trajectory": curriculum.history,
            "curriculum_final_probabilities": curriculum.history[-1]["p"] if curriculum.history else {},
            "curriculum_pulls": dict(curriculum.pulls),
            # The sampler may draw one batch past the last step (the dataloader reads ahead).
            "curriculum_drawn_ids": drawn,
        }

    return measure
