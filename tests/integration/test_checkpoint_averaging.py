"""average_last: a trainer stage at constant LR writes the mean of its own last K checkpoints."""

from __future__ import annotations

import json

import pytest
from helpers.projects import TRAINING, make_project
from helpers.tiny import deep_update, tiny_raw
from safetensors.torch import load_file

from posttrain.errors import ParamsError


def test_stage_model_is_the_average_of_its_last_checkpoints(tmp_path) -> None:
    import stages.pretrain

    raw = tiny_raw(TRAINING)
    deep_update(raw["pretrain"], {"trainer": {"max_steps": 6, "save_steps": 2}, "schedule": {"name": "constant"}})
    raw["pretrain"]["average_last"] = 2
    params, layout = make_project(tmp_path, raw)
    stages.pretrain.run(params, layout)

    metrics = json.loads(layout.metrics("pretrain").read_text())
    assert metrics["averaged_checkpoints"] == ["checkpoint-4", "checkpoint-6"]
    folder = tmp_path / metrics["checkpoints"]
    last = [load_file(str(folder / name / "model.safetensors")) for name in metrics["averaged_checkpoints"]]
    written = load_file(str(layout.model("pretrain") / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    expected = (last[0][name].double() + last[1][name].double()) / 2
    assert (written[name].double() - expected).abs().max() < 1e-6
    assert (written[name] - last[1][name]).abs().max() > 1e-6  # not simply the last step's weights


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"average_last": 2, "schedule": {"name": "wsd"}}, "expected schedule.name 'constant'"),
        (
            {"average_last": 5, "schedule": {"name": "constant"}, "trainer": {"max_steps": 6, "save_steps": 2}},
            "saves only 3",
        ),
    ],
)
def test_average_last_needs_constant_lr_and_enough_checkpoints(section, message) -> None:
    from posttrain.config import parse_params

    with pytest.raises(ParamsError, match=message):
        parse_params(tiny_raw(sft=section))
