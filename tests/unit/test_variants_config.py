"""`variants.<stage>.<name>`: a training stage's section with overrides, its own seed and mixture."""

from __future__ import annotations

from typing import Any

import pytest
from helpers.tiny import tiny_raw

from posttrain.config import parse_params
from posttrain.errors import ParamsError
from posttrain.layout import Layout


def with_variant(overrides: dict[str, Any], mixture: bool = True) -> dict[str, Any]:
    raw = tiny_raw()
    raw["variants"] = {"sft": {"arith": overrides}}
    if mixture:
        raw["mixtures"]["sft@arith"] = {**raw["mixtures"]["sft"], "weights": {"add3": 1.0}}
    return raw


def test_variant_section_is_the_stage_section_with_overrides() -> None:
    params = parse_params(with_variant({"seed": 7, "trainer": {"max_steps": 3}, "schedule": {"name": "constant"}}))
    section, base = params.stage_section("sft@arith"), params.sft
    assert section.trainer.max_steps == 3 and section.trainer.learning_rate == base.trainer.learning_rate
    assert section.schedule.name == "constant" and base.schedule.name != "constant"
    assert params.stage_seed("sft@arith") == 7 and params.stage_seed("sft") == params.seed
    assert params.variant_names() == {"sft@arith"}


def test_variants_can_be_merged_evaluated_and_promoted() -> None:
    raw = with_variant({})
    raw["merge"] = {"method": "ties", "models": ["sft@arith", "sft"], "base": "cpt"}
    raw["evaluate"]["models"] = ["cpt", "sft", "sft@arith", "merge"]
    raw["promotion"] = {"candidate": {"best_of": ["sft@arith", "merge"]}}
    assert parse_params(raw).merge.models == ["sft@arith", "sft"]


def test_variant_model_folder_is_under_artifacts_variants(tmp_path) -> None:
    assert Layout(tmp_path).model("sft@arith") == tmp_path / "artifacts" / "variants" / "sft@arith"


@pytest.mark.parametrize(
    ("overrides", "mixture", "message"),
    [
        ({"max_length": -1}, True, "variants.sft.arith.max_length"),
        ({"trainer": {"nope": 1}, "bogus": 1}, True, "variants.sft.arith.bogus"),
        ({"seed": "x"}, True, "variants.sft.arith.seed"),
        ({}, False, "mixtures.sft@arith"),
    ],
)
def test_variant_errors_name_the_key(overrides: dict[str, Any], mixture: bool, message: str) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(with_variant(overrides, mixture))
    assert message in str(info.value)


def test_unknown_variant_stage_and_unknown_merge_input_are_named() -> None:
    raw = tiny_raw()
    raw["variants"] = {"sft": {}, "grpo": {"a": {}}}
    with pytest.raises(ParamsError, match=r"variants\.grpo"):
        parse_params(raw)
    raw = tiny_raw()
    raw["merge"] = {"models": ["sft@missing"]}
    with pytest.raises(ParamsError, match=r"merge\.models\[0\]"):
        parse_params(raw)
