"""WiSE-FT's choice of alpha (posttrain.models.wise_ft.select_alpha) on hand-built validation curves, and the
interpolation itself."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model, tiny_params

from posttrain.config import ParamsError
from posttrain.models.wise_ft import CurvePoint, interpolate_, select_alpha


def _curve(*points: tuple[float, float, float]) -> list[CurvePoint]:
    return [CurvePoint(alpha, em, loss, {}) for alpha, em, loss in points]


def test_lowest_probe_loss_among_alphas_that_keep_the_gain() -> None:
    # gain 0.50 (0.10 -> 0.60); keeping 90% needs >= 0.55: alphas 0.75 and 1.0; 0.75 forgets less.
    curve = _curve((0.0, 0.10, 2.0), (0.25, 0.30, 2.1), (0.5, 0.50, 2.2), (0.75, 0.58, 2.4), (1.0, 0.60, 2.9))
    choice = select_alpha(curve, 0.9)
    assert choice["alpha"] == 0.75 and choice["eligible_alphas"] == [0.75, 1.0]
    assert choice["validation_gain"] == pytest.approx(0.5) and choice["gain_kept"] == pytest.approx(0.96)
    assert select_alpha(curve, 0.5)["alpha"] == 0.5  # a looser rule recovers more
    assert select_alpha(curve, 1.0)["alpha"] == 1.0


def test_no_gain_means_any_alpha_and_ties_go_to_the_trained_model() -> None:
    flat = _curve((0.0, 0.5, 2.0), (0.5, 0.5, 2.0), (1.0, 0.4, 2.5))
    choice = select_alpha(flat, 0.9)
    assert choice["alpha"] == 0.5 and choice["gain_kept"] is None and "every alpha eligible" in choice["rule"]
    with pytest.raises(ValueError, match="alpha 0 and alpha 1"):
        select_alpha(_curve((0.0, 0.1, 1.0), (0.5, 0.2, 1.0)), 0.9)


def test_interpolation_is_exact_at_the_ends_and_linear_between() -> None:
    (final, _), (base, _) = tiny_model(seed=1), tiny_model(seed=2)
    a, b = {k: v.clone() for k, v in final.state_dict().items()}, base.state_dict()
    model, _ = tiny_model(seed=3)
    for alpha in (0.0, 0.3, 1.0):
        interpolate_(model, a, b, alpha)
        for name, parameter in model.named_parameters():
            assert torch.allclose(parameter, alpha * a[name] + (1 - alpha) * b[name])
    interpolate_(model, a, b, 1.0)
    assert all(torch.equal(p, a[n]) for n, p in model.named_parameters())


def test_wise_ft_config_names_its_models_and_domains() -> None:
    merge = {
        "method": "wise_ft",
        "models": ["grpo", "pretrain"],
        "weights": None,
        "wise_ft": {"task_domains": ["add3"], "probe_domain": "add"},
    }
    assert tiny_params(merge=merge).merge.wise_ft.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ParamsError, match=r"merge.wise_ft.probe_domain: got 'chat'"):
        tiny_params(merge={**merge, "wise_ft": {"task_domains": ["add3"], "probe_domain": "chat"}})
    with pytest.raises(ParamsError, match="must include 0.0"):
        tiny_params(merge={**merge, "wise_ft": {"task_domains": ["add3"], "probe_domain": "add", "alphas": [0.5, 1.0]}})
    with pytest.raises(ParamsError, match=r"wise_ft interpolates merge.models = \[final, base\]"):
        tiny_params(merge={**merge, "models": ["grpo"]})
