"""GRPO with the UCB curriculum and with the hybrid SFT/RL rule, for real on a tiny model (a few TRL steps)."""

from __future__ import annotations

import json

import pytest
from helpers.projects import DPO_GRPO, build_trained_input_project
from helpers.tiny import tiny_raw

from posttrain.config import parse_params


def _params(**grpo):
    raw = tiny_raw(DPO_GRPO)
    # One domain with easy, middling and hard buckets (1-, 2- and 3-digit operands).
    raw["data"]["domains"] = {"add": {"kind": "addition", "digits": 1, "max_digits": 3, "n_items": 300}}
    raw["model"]["tokenizer"]["domains"] = None  # every domain
    raw["promotion"]["compare_domain"] = "add"
    for mixture in raw["mixtures"].values():
        mixture["weights"] = {"add": 1.0}
    raw["grpo"].update(grpo)
    return parse_params(raw)


@pytest.mark.parametrize("rerun", [False, True])
def test_curriculum_logs_arm_probabilities_and_reruns_to_the_same_order(tmp_path, rerun) -> None:
    from stages import grpo

    params = _params(curriculum={"method": "ucb", "arms": "difficulty"})
    orders = []
    for attempt in range(2 if rerun else 1):
        layout = build_trained_input_project(params, tmp_path / f"p{attempt}", "dpo")
        result = grpo.run(params, layout)
        metrics = json.loads(layout.metrics("grpo").read_text())
        orders.append(metrics["curriculum_drawn_ids"])
    trajectory = metrics["curriculum_trajectory"]
    assert set(trajectory[0]["p"]) == {"add/d1", "add/d2", "add/d3"}
    assert all(abs(sum(point["p"].values()) - 1) < 1e-5 for point in trajectory)
    assert layout.plots / "grpo_curriculum.png" in result.artifacts
    assert len(orders[0]) >= 3 * 2  # 3 steps x 2 prompts (8 rollouts / 4 generations)
    if rerun:
        assert orders[0] == orders[1]


def test_hybrid_trains_failed_prompts_with_sft(tmp_path) -> None:
    from stages import grpo

    params = _params(hybrid={"threshold": 0.0})
    layout = build_trained_input_project(params, tmp_path, "dpo")
    grpo.run(params, layout)
    metrics = json.loads(layout.metrics("grpo").read_text())
    assert metrics["hybrid_sft_share_mean"] == 1.0 and metrics["hybrid_trajectory"][0]["sft_share"] == 1.0
    state = sorted((layout.root / "checkpoints").glob("grpo-*/checkpoint-*"))[-1] / "trainer_state.json"
    shares = [e["hybrid/sft_share"] for e in json.loads(state.read_text())["log_history"] if "hybrid/sft_share" in e]
    # An untrained model gets every sum wrong: every prompt takes the SFT branch.
    assert shares and all(s == 1.0 for s in shares)
