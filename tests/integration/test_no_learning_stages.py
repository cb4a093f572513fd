"""`<stage>.no_learning` on real stages with a tiny model: a stage that cannot learn or did not says so in its
metrics, and with `action: fail` stops without writing a model; GRPO stops before its first step when nearly
every held-out group of samples scores the same (issue 26)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.projects import DPO_GRPO, build_trained_input_project
from helpers.tiny import tiny_raw

from posttrain.config import parse_params
from posttrain.errors import StageError

# lr 1e-30: the updates are far below the weights' precision, so the loss cannot move.
STILL = {"trainer": {"learning_rate": 1.0e-30, "max_steps": 6, "logging_steps": 1, "save_steps": 6}}
# Exact match alone on 3-digit sums for an untrained model: every sample wrong, every group's rewards equal.
FLAT_REWARD = {"rewards": [{"name": "exact_match", "weight": 1.0}]}


def test_sft_whose_loss_did_not_move_warns_or_fails(tmp_path: Path) -> None:
    from stages import sft

    params = parse_params(tiny_raw(DPO_GRPO, sft=STILL))
    layout = build_trained_input_project(params, tmp_path, "cpt")
    sft.run(params, layout)
    record = json.loads(layout.metrics("sft").read_text())["no_learning"]
    assert record["action"] == "warn" and "loss_change" in record["triggered"]
    assert record["checks"]["loss_change"]["value"] < 0.01

    failing = parse_params(tiny_raw(DPO_GRPO, sft={**STILL, "no_learning": {"action": "fail"}}))
    with pytest.raises(
        StageError, match=r"stage sft: learned nothing: loss_change: training loss moved .* no model written"
    ):
        sft.run(failing, layout)


@pytest.fixture
def flat_project(tmp_path: Path):
    params = parse_params(tiny_raw(DPO_GRPO, grpo=FLAT_REWARD))
    return params, build_trained_input_project(params, tmp_path, "dpo")


def test_grpo_stops_before_training_when_groups_have_no_reward_variance(flat_project) -> None:
    from stages import grpo

    _, layout = flat_project
    params = parse_params(tiny_raw(DPO_GRPO, grpo={**FLAT_REWARD, "no_learning": {"action": "fail"}}))
    with pytest.raises(StageError, match=r"stage grpo: learned nothing: zero_variance_groups: 100% of 8 held-out"):
        grpo.run(params, layout)
    assert not list((layout.root / "checkpoints").glob("grpo-*/checkpoint-*"))  # not one step trained


def test_grpo_that_changed_no_weight_says_so(flat_project) -> None:
    """Issue 26's run: zero advantage everywhere, so the trained weights are the input's, bit for bit."""
    from stages import grpo

    params, layout = flat_project
    grpo.run(params, layout)  # default action warn, and the zero-variance check off below
    record = json.loads(layout.metrics("grpo").read_text())["no_learning"]
    assert record["triggered"] == ["zero_variance_groups", "unchanged_weights"]
    assert record["checks"]["zero_variance_groups"]["value"] == 1.0

    only_after = {**FLAT_REWARD, "no_learning": {"action": "fail", "max_zero_variance_groups": None}}
    with pytest.raises(StageError, match=r"learned nothing: unchanged_weights: the trained weights are bit-identical"):
        grpo.run(parse_params(tiny_raw(DPO_GRPO, grpo=only_after)), layout)
