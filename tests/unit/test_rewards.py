"""Reward registry: values on hand-made cases, unknown names, failures naming the function."""

from __future__ import annotations

import sys

import pytest

from posttrain.config import GRPOStageConfig, RewardSpec
from posttrain.errors import ParamsError, StageError
from posttrain.scoring.rewards import (
    REWARDS,
    build_rewards,
    combined_reward,
    digit_match,
    exact_match,
    format_reward,
    get_reward,
    guarded,
    length_penalty,
    normalise,
)


def test_normalise_strips_and_cuts_at_whitespace() -> None:
    assert normalise("  46 ") == "46"
    assert normalise("46 12+3=") == "46"
    assert normalise("46\n7") == "46"
    assert normalise("   ") == ""


def test_exact_match() -> None:
    completions = ["46", " 46 ", "46 junk", "47", "", "046"]
    assert exact_match(completions, answer=["46"] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_digit_match_partial_credit_and_length_penalty() -> None:
    answer = ["579"] * 6
    completions = ["579", "578", "479", "57", "5790", ""]
    scores = digit_match(completions, answer=answer)
    assert scores == pytest.approx([1.0, 2 / 3, 2 / 3, 2 / 3, 3 / 4, 0.0])
    # A wrong length never scores as much as the right answer, and partial credit orders samples.
    assert max(scores[1:]) < 1.0
    assert digit_match(["cba"], answer=["cba"]) == [1.0]
    assert digit_match([""], answer=[""]) == [1.0]
    assert digit_match(["x"], answer=[""]) == [0.0]


def test_format_reward_shapes() -> None:
    numbers = ["123", " 123 ", "12a", "123 45", "", "-7"]
    assert format_reward(numbers, answer=["579"] * 5 + ["-3"]) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    words = ["cba", "cb4", "c b"]
    assert format_reward(words, answer=["abc"] * 3) == [1.0, 0.0, 0.0]
    # A free-form gold answer only asks for one non-empty token.
    assert format_reward(["a+b", "a + b"], answer=["x+y", "x+y"]) == [1.0, 0.0]
    assert REWARDS["format"] is format_reward and format_reward.__name__ == "format"


def test_length_penalty() -> None:
    answer = ["46"] * 5
    completions = ["46", "4", "467", "46 12+3", "46666666666"]
    assert length_penalty(completions, answer=answer) == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_rewards_ignore_other_columns() -> None:
    # TRL passes every non-prompt column plus trainer_state, log_metric, ... as keywords.
    extra = {"verifier": ["exact"], "id": ["x"], "trainer_state": None, "log_metric": print}
    for func in REWARDS.values():
        assert len(func(["46"], answer=["46"], **extra)) == 1


def test_unknown_reward_lists_known_names() -> None:
    with pytest.raises(ParamsError, match="unknown reward function 'bleu'") as info:
        get_reward("bleu")
    for name in REWARDS:
        assert name in str(info.value)


def test_validation_rejects_unknown_reward_name() -> None:
    with pytest.raises(ValueError, match="exact_match"):
        GRPOStageConfig(rewards=[RewardSpec(name="exact_mach")])
    assert GRPOStageConfig(rewards=[RewardSpec(name="format")]).rewards[0].name == "format"


def test_validation_checks_group_fits_batch() -> None:
    with pytest.raises(ValueError, match="divisible by num_generations"):
        GRPOStageConfig.model_validate({"trainer": {"per_device_train_batch_size": 12}, "num_generations": 8})
    GRPOStageConfig.model_validate({"trainer": {"per_device_train_batch_size": 16}, "num_generations": 8})


def test_config_import_stays_light() -> None:
    # The validator imports posttrain.scoring.rewards; neither may pull in torch.
    import subprocess

    code = "import sys, posttrain.config, posttrain.scoring.rewards; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_raising_reward_names_the_function() -> None:
    def broken(completions: list[str], answer: list[str], **_: object) -> list[float]:
        raise ZeroDivisionError("boom")

    with pytest.raises(StageError, match=r"reward function 'broken' failed: ZeroDivisionError: boom"):
        guarded("broken", broken)(["1"], answer=["1"])


def test_guard_checks_length_and_finiteness_and_answer_column() -> None:
    with pytest.raises(StageError, match="'short' returned 1 values for 2"):
        guarded("short", lambda completions, **_: [1.0])(["1", "2"], answer=["1", "2"])
    with pytest.raises(StageError, match="'nan' returned non-finite"):
        guarded("nan", lambda completions, **_: [float("nan")])(["1"], answer=["1"])
    with pytest.raises(StageError, match="no 'answer' column"):
        guarded("exact_match", exact_match)(["1"], solution=["1"])


def test_build_rewards_keeps_names_and_weights() -> None:
    funcs, weights = build_rewards([RewardSpec(name="digit_match", weight=0.5), RewardSpec(name="exact_match")])
    assert [f.__name__ for f in funcs] == ["digit_match", "exact_match"]
    assert weights == [0.5, 1.0]
    specs = [RewardSpec(name="digit_match", weight=0.5), RewardSpec(name="exact_match", weight=1.0)]
    assert combined_reward(specs, ["579", "578"], answer=["579", "579"]) == pytest.approx([1.5, 1 / 3])
