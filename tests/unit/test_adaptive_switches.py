"""`dvc exp run -S` turns each adaptive data method on: DVC's own override parser on a copy of params.yaml."""

from __future__ import annotations

import shutil

import pytest
from helpers.tiny import REPO

from posttrain.config import load_params

SWITCHES = {
    "grpo.curriculum={method:ucb}": lambda p: p.grpo.curriculum.method == "ucb",
    "grpo.hybrid={threshold:0.0}": lambda p: p.grpo.hybrid.threshold == 0.0,
    "mixtures.sft.adaptive={method:aioli}": lambda p: p.mixtures["sft"].adaptive.method == "aioli",
}


def test_methods_are_off_in_the_default_recipe() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.grpo.curriculum is None and params.grpo.hybrid is None
    assert all(m.adaptive is None for m in params.mixtures.values())


@pytest.mark.parametrize("override", sorted(SWITCHES))
def test_dvc_set_param_switches_the_method_on(tmp_path, override: str) -> None:
    from dvc.utils.hydra import apply_overrides  # the function behind `dvc exp run -S`

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    apply_overrides(str(path), [override])
    assert SWITCHES[override](load_params(path))
