"""merge.method wise_ft on a tiny project: the curve over alpha and the choice come from validation items only
(the test splits are deleted before the merge runs), and the merged model is alpha * final + (1 - alpha) * base."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers.projects import DPO_GRPO, build_trained_input_project
from helpers.tiny import tiny_raw

from posttrain.config import parse_params
from posttrain.lineage import parent_entry, verify_model_folder
from posttrain.models.loading import load_stage_model
from posttrain.training.outputs import write_model_output

WISE_FT = {
    "method": "wise_ft",
    "models": ["grpo", "pretrain"],
    "weights": None,
    "wise_ft": {"alphas": [0.0, 0.5, 1.0], "task_domains": ["add", "add3"], "probe_domain": "rev", "eval_items": 8},
}


def test_alpha_is_chosen_on_validation_items_only(tmp_path: Path) -> None:
    from stages import merge

    params = parse_params(tiny_raw(DPO_GRPO, merge=WISE_FT))
    layout = build_trained_input_project(params, tmp_path, "pretrain")
    # A "final" model of the same line: the base with its weights moved, its lineage naming the base.
    base = load_stage_model(layout.model("pretrain"))
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in base.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    write_model_output("grpo", base.model, base.tokenizer, params=params, layout=layout, section=params.grpo,
                       parents=[parent_entry(layout.model("pretrain"), layout.root)], data_manifest=None, metrics={})  # fmt: skip
    for test_split in layout.prepared.glob("*/test.parquet"):
        test_split.unlink()  # nothing may read them

    merge.run(params, layout)

    metrics = json.loads(layout.metrics("merge").read_text())
    choice = metrics["wise_ft"]
    assert [p["alpha"] for p in choice["curve"]] == [0.0, 0.5, 1.0]
    assert choice["alpha"] in choice["eligible_alphas"]
    assert metrics["weights"] == {"grpo": choice["alpha"], "pretrain": 1.0 - choice["alpha"]}
    for point in choice["curve"]:
        assert set(point["per_domain"]) == {"add", "add3", "rev"} and point["probe_loss"] > 0
    assert (layout.plots / "merge_wise_ft.png").is_file() and (layout.plots / "merge_wise_ft.json").is_file()

    lineage = verify_model_folder(layout.model("merge"))
    assert lineage["merge"]["method"] == "wise_ft" and lineage["merge"]["alpha"] == choice["alpha"]
    merged = load_stage_model(layout.model("merge")).model.state_dict()
    final, start = (
        load_stage_model(layout.model("grpo")).model.state_dict(),
        load_stage_model(layout.model("pretrain")).model.state_dict(),
    )
    alpha = choice["alpha"]
    for name, tensor in merged.items():
        assert torch.allclose(tensor, alpha * final[name] + (1 - alpha) * start[name], atol=1e-6), name
