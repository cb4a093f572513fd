"""`<stage>.no_learning`: the checks that a stage learned something, and warn vs fail (posttrain.training.no_learning)."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.tiny import tiny_model, tiny_params

from posttrain.config import GRPONoLearningConfig, NoLearningConfig
from posttrain.errors import ParamsError, StageError
from posttrain.training.no_learning import (
    after_training_checks,
    enforce,
    loss_change,
    weights_digest,
    zero_variance_check,
)


def test_loss_change_compares_the_means_of_the_first_and_last_logs() -> None:
    assert loss_change([2.0]) is None
    assert loss_change([2.0, 1.0]) == pytest.approx(0.5)
    # Up to 3 logs at each end: (4 + 4 + 4) / 3 vs (1 + 1 + 1) / 3.
    assert loss_change([4.0, 4.0, 4.0, 9.0, 1.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert loss_change([0.69, 0.69, 0.69, 0.69]) == 0.0


def test_weights_digest_sees_a_one_ulp_change_and_only_trainable_weights() -> None:
    model, _ = tiny_model()
    before = weights_digest(model)
    assert weights_digest(model) == before
    parameter = next(model.parameters())
    with torch.no_grad():
        parameter.view(-1)[0] = torch.nextafter(parameter.view(-1)[0], torch.tensor(float("inf")))
    assert weights_digest(model) != before
    parameter.requires_grad_(False)  # a frozen weight (a LoRA base) is not the stage's to change
    frozen = weights_digest(model)
    with torch.no_grad():
        parameter.add_(1.0)
    assert weights_digest(model) == frozen


def test_after_training_checks_trigger_on_unchanged_weights_and_a_flat_loss() -> None:
    cfg = NoLearningConfig()
    checks = {c.name: c for c in after_training_checks(cfg, [0.693, 0.693, 0.693], "a", "a")}
    assert checks["unchanged_weights"].triggered and checks["loss_change"].triggered
    checks = {c.name: c for c in after_training_checks(cfg, [4.8, 1.5, 0.3, 0.1], "a", "b")}
    assert not checks["unchanged_weights"].triggered and not checks["loss_change"].triggered
    # One logged loss: not measured, not triggered. GRPO: the loss is not checked by default.
    (single,) = [c for c in after_training_checks(cfg, [2.0], None, None) if c.name == "loss_change"]
    assert single.value is None and not single.triggered
    assert [c.name for c in after_training_checks(GRPONoLearningConfig(), [0.0, 0.0], "a", "b")] == [
        "unchanged_weights"
    ]


def test_zero_variance_check_uses_the_recipe_threshold() -> None:
    assert zero_variance_check(GRPONoLearningConfig(), 0.91, 32).triggered
    assert not zero_variance_check(GRPONoLearningConfig(), 0.75, 32).triggered
    assert not zero_variance_check(GRPONoLearningConfig(max_zero_variance_groups=None), 1.0, 32).triggered


def test_enforce_warns_or_fails_and_records_every_check(caplog) -> None:
    checks = after_training_checks(NoLearningConfig(), [0.7, 0.7], "a", "a")
    earlier = [zero_variance_check(GRPONoLearningConfig(), 0.5, 8)]
    with caplog.at_level(logging.WARNING):
        record = enforce("dpo", NoLearningConfig(action="warn"), checks, earlier=earlier)
    assert record["triggered"] == ["unchanged_weights", "loss_change"]
    assert set(record["checks"]) == {"zero_variance_groups", "unchanged_weights", "loss_change"}
    assert "dpo did not learn: the trained weights are bit-identical" in caplog.text
    with pytest.raises(StageError, match=r"stage dpo: learned nothing: unchanged_weights: .*no model written.*"
                       r"dpo.no_learning.action: warn"):  # fmt: skip
        enforce("dpo", NoLearningConfig(action="fail"), checks)
    assert enforce("dpo", NoLearningConfig(action="fail"), [])["triggered"] == []


def test_policy_is_typed_per_stage() -> None:
    params = tiny_params(grpo={"no_learning": {"action": "fail", "max_zero_variance_groups": 0.5}})
    assert params.grpo.no_learning.max_zero_variance_groups == 0.5 and params.grpo.no_learning.min_loss_change is None
    assert params.sft.no_learning.action == "warn" and params.sft.no_learning.min_loss_change == 0.01
    with pytest.raises(ParamsError, match=r"sft.no_learning.max_zero_variance_groups: unknown key"):
        tiny_params(sft={"no_learning": {"max_zero_variance_groups": 0.5}})
    with pytest.raises(ParamsError, match=r"dpo.no_learning.action"):
        tiny_params(dpo={"no_learning": {"action": "stop"}})
