"""The UCB curriculum for GRPO: scores, starvation of zero-advantage arms, seeded data order."""

from __future__ import annotations

import random

from posttrain.config import CurriculumConfig
from posttrain.training.curriculum import CurriculumSampler, UCBCurriculum, arm_of, group_abs_advantages


def _simulate(seed: int, rounds: int = 60) -> tuple[UCBCurriculum, list[int]]:
    """Arms `flat` (constant rewards: zero advantage) and `learn` (|advantage| ~ 0.8); 4 prompts per batch."""
    curriculum = UCBCurriculum(["flat", "learn"], CurriculumConfig())
    row_arms = ["flat"] * 40 + ["learn"] * 40
    sampler = CurriculumSampler(
        curriculum, row_arms, prompts_per_batch=4, mini_repeat_count=2, repeat_count=1, seed=seed
    )
    noise = random.Random(0)
    order = []
    for position, index in enumerate(iter(sampler)):
        order.append(index)
        if position % 2 == 1:  # one feedback per group of mini_repeat_count
            arm = row_arms[index]
            curriculum.update(arm, 0.0 if arm == "flat" else 0.8 + 0.1 * noise.random())
        if len(order) >= rounds * 8:
            break
    return curriculum, order


def test_ucb_starves_an_arm_whose_rewards_are_constant() -> None:
    curriculum, order = _simulate(seed=0)
    p = curriculum.probabilities()
    assert p["flat"] < 0.05 < 0.95 < p["learn"]
    # Over the last half of the run nearly every prompt came from the learnable arm.
    late = order[len(order) // 2 :]
    assert sum(index < 40 for index in late) / len(late) < 0.1


def test_unvisited_arms_start_uniform_and_scores_add_the_bonus() -> None:
    curriculum = UCBCurriculum(["a", "b", "c"], CurriculumConfig(exploration=1.0))
    assert curriculum.probabilities() == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    curriculum.update("a", 0.5)
    scores = curriculum.scores()
    assert scores["a"] < scores["b"] + 0.5  # a's bonus shrank with its pull; b's mean is 0
    assert scores["b"] == scores["c"]


def test_rerun_gives_the_same_data_order() -> None:
    assert _simulate(seed=3)[1] == _simulate(seed=3)[1]
    assert _simulate(seed=3)[1] != _simulate(seed=4)[1]


def test_sampler_layout_matches_trl_repeat_sampler() -> None:
    curriculum = UCBCurriculum(["x"], CurriculumConfig())
    sampler = CurriculumSampler(curriculum, ["x"] * 6, prompts_per_batch=2, mini_repeat_count=3, repeat_count=2, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 3 * 2 * 3 * 2
    first = order[:12]  # one generation batch: 2 prompts x 3 generations, repeated twice
    assert first[:6] == first[6:] and first[:3] == [first[0]] * 3 and first[3:6] == [first[3]] * 3
    # Within an arm, each pass is a permutation: 3 batches x 2 prompts = all 6 items once.
    assert sorted(curriculum.drawn) == list(range(6))


def test_arms_and_group_advantages() -> None:
    row = {"domain": "add", "prompt": "123+4="}
    assert arm_of(row, "domain") == "add" and arm_of(row, "difficulty") == "add/d3"
    assert group_abs_advantages([1.0, -1.0, 0.0, 0.0], 2) == [1.0, 0.0]
