"""Online mixing (mixtures.sft.adaptive) in the sft stage, for real on a tiny model."""

from __future__ import annotations

import json

from helpers.projects import DPO_GRPO, build_trained_input_project
from helpers.tiny import tiny_raw

from posttrain.config import parse_params
from posttrain.io import read_json

ADAPTIVE = {"method": "aioli", "rounds": 2, "probe_steps": 1, "eval_items": 8}


def _run(root):
    from stages import sft

    raw = tiny_raw(DPO_GRPO, sft={"trainer": {"max_steps": 12, "per_device_train_batch_size": 8}})
    raw["mixtures"]["sft"]["adaptive"] = ADAPTIVE
    params = parse_params(raw)
    layout = build_trained_input_project(params, root, "cpt")
    result = sft.run(params, layout)
    return layout, result, json.loads(layout.metrics("sft").read_text())


def test_online_mixing_records_trajectory_items_and_stays_in_budget(tmp_path) -> None:
    layout, result, metrics = _run(tmp_path / "a")
    domains = set(read_json(layout.mixture("sft") / "manifest.json")["output_proportions"])
    trajectory = metrics["mixing_trajectory"]
    assert [point["step"] for point in trajectory] == [0, 2]  # 4 main steps (12 - 2 rounds x 4 domains x 1 probe step)
    assert all(set(point["p"]) == domains and abs(sum(point["p"].values()) - 1) < 1e-5 for point in trajectory)
    assert set(trajectory[0]["interaction"]) == domains
    # The probes really train (a probe that leaves the weights as they were measures no change at all),
    # and the update moves the proportions off the static weights.
    assert all(trajectory[0]["interaction"][d][d] > 0 for d in domains)
    static = read_json(layout.mixture("sft") / "manifest.json")["output_proportions"]
    assert metrics["mixing_final_proportions"] != {d: round(p, 6) for d, p in static.items()}
    # Budget: main steps + probe steps = trainer.max_steps; rows trained + probed = max_steps x batch.
    assert metrics["steps"] == metrics["mixing_main_steps"] == 4 and metrics["mixing_probe_steps"] == 8
    assert metrics["mixing_rows_trained"] + metrics["mixing_rows_probed"] == 12 * 8
    assert len(metrics["mixing_seen_ids"]) == 32 and len(metrics["mixing_probe_ids"]) == 64
    assert layout.plots / "sft_mixing.png" in result.artifacts
    # A rerun with the same inputs: the same trajectory and the same rows in the same order.
    _, _, again = _run(tmp_path / "b")
    assert again["mixing_trajectory"] == trajectory
    assert again["mixing_seen_ids"] == metrics["mixing_seen_ids"]
