"""DPO and GRPO stages, for real on a tiny model: a few TRL steps each, then the outputs are checked.

One module-scoped project: real prepare + mix on a few hundred items, an (untrained) tiny "sft"
model written with the shared model writer, then dpo on it and grpo on the dpo output.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from helpers.projects import DPO_GRPO, STEPS, build_trained_input_project
from helpers.tiny import tiny_raw

from posttrain.config import Params, parse_params
from posttrain.errors import StageError
from posttrain.layout import Layout
from posttrain.lineage import verify_model_folder


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Params, Layout]:
    """Prepared data, mixtures and a tiny sft model with lineage, in a temporary project root."""
    params = parse_params(tiny_raw(DPO_GRPO))
    return params, build_trained_input_project(params, tmp_path_factory.mktemp("project"), "sft")


@pytest.fixture(scope="module")
def dpo_result(project):
    from stages import dpo

    params, layout = project
    return dpo.run(params, layout)


def weights_differ(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return any(not left[k].equal(right[k]) for k in left)


def test_dpo_stage_writes_model_lineage_and_metrics(project, dpo_result) -> None:
    params, layout = project
    folder = layout.model("dpo")
    assert dpo_result.model_dir == folder
    lineage = verify_model_folder(folder)
    assert lineage["stage"] == "dpo" and [p["stage"] for p in lineage["parents"]] == ["sft"]
    assert lineage["params"]["beta"] == params.dpo.beta
    assert weights_differ(layout.model("sft"), folder)  # DPO actually moved the policy

    metrics = json.loads(layout.metrics("dpo").read_text())
    assert metrics["steps"] == STEPS and metrics["pairs"] == "on_policy"
    counts = metrics["pair_counts"]
    assert counts["on_policy"] + counts["offline"] == 48 and counts["samples"] == 48 * 4
    assert metrics["held_out_pairs"] == 8 * len(metrics["dpo_domains"])
    for key in ("logp_margin_before", "logp_margin_after", "reward_margin_after"):
        assert isinstance(metrics[key], float), key
    assert metrics["logp_margin_after"] != metrics["logp_margin_before"]
    assert metrics["reward_margin_after"] == pytest.approx(
        params.dpo.beta * (metrics["logp_margin_after"] - metrics["logp_margin_before"])
    )
    # TRL's own implicit-reward margin is logged every step and starts at 0 (policy == reference).
    margins = [e["rewards/margins"] for e in metrics["train_series"] if "rewards/margins" in e]
    assert len(margins) >= STEPS and margins[0] == pytest.approx(0.0, abs=1e-6)
    assert set(metrics["exact_match_before"]) == set(metrics["dpo_domains"])
    assert dpo_result.metrics["logp_margin_after"] == metrics["logp_margin_after"]


def test_dpo_margin_matches_trl_reward_definition(project, dpo_result) -> None:
    """Our held-out margin uses TRL's tokenization: on a training pair, beta * (policy - reference)
    log-ratio margin equals TRL's rewards/margins for the same batch of one pair."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from posttrain.models import loading
    from posttrain.scoring import preference as preferences

    params, layout = project
    policy = loading.load_stage_model(layout.model("dpo"))
    reference = loading.load_stage_model(layout.model("sft")).model
    pair = {"prompt": "12+34=", "chosen": "46", "rejected": "45"}
    config = DPOConfig(
        output_dir=str(layout.root / "scratch"), beta=0.1, use_cpu=True, bf16=False, report_to="none",
        per_device_eval_batch_size=1, activation_checkpointing=False,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=policy.model, ref_model=reference, args=config, processing_class=policy.tokenizer,
        train_dataset=datasets.Dataset.from_list([pair]), eval_dataset=datasets.Dataset.from_list([pair]),
    )  # fmt: skip
    trl_margin = trainer.evaluate()["eval_rewards/margins"]
    ours = 0.1 * (
        preferences.preference_margins(policy.model, policy.tokenizer, [pair])[0]
        - preferences.preference_margins(reference, policy.tokenizer, [pair])[0]
    )
    assert ours == pytest.approx(trl_margin, rel=1e-3, abs=1e-5)


@pytest.fixture(scope="module")
def grpo_result(project, dpo_result):
    from stages import grpo

    params, layout = project
    return grpo.run(params, layout)


def test_grpo_stage_writes_model_lineage_and_reward_metrics(project, grpo_result) -> None:
    params, layout = project
    folder = layout.model("grpo")
    lineage = verify_model_folder(folder)
    assert lineage["stage"] == "grpo" and [p["stage"] for p in lineage["parents"]] == ["dpo"]

    metrics = json.loads(layout.metrics("grpo").read_text())
    assert metrics["steps"] == STEPS
    assert metrics["held_out_prompts"] == 8 * len(metrics["grpo_domains"])
    for side in ("before", "after"):
        for key in ("greedy_reward", "sampled_reward", "greedy_exact_match", "sampled_zero_variance_groups"):
            assert 0.0 <= metrics[f"{key}_{side}"] <= 2.0, (key, side)  # rewards: digit_match + exact_match
    curve = [e for e in metrics["reward_curve"] if "reward" in e]
    assert len(curve) >= STEPS
    # Each registered reward is logged under its registry name; zero-variance share is logged too.
    assert {"rewards/digit_match/mean", "rewards/exact_match/mean", "frac_reward_zero_std"} <= set(curve[0])
    assert json.loads((layout.plots / "grpo_rewards.json").read_text()) == metrics["reward_curve"]
    assert layout.plots / "grpo_rewards.json" in grpo_result.artifacts


def test_grpo_logs_the_generation_reward_update_split(project, grpo_result) -> None:
    """Every optimizer step's time split (posttrain.training.rollout_timing), checked against TRL's own
    log of the same steps, and where it lands: metrics.json, the stage result (MLflow scalars) and
    the MLflow step series."""
    from posttrain.tracking.runs import series_metrics

    _, layout = project
    metrics = json.loads(layout.metrics("grpo").read_text())
    rows, summary = metrics["rollout_steps"], metrics["rollout_timing"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    lengths = {
        e["step"]: e["completions/mean_length"] for e in metrics["reward_curve"] if "completions/mean_length" in e
    }
    for row in rows:
        # One generation batch per step: 8 rows per device = 2 prompts x 4 generations.
        assert row["completions"] == 8 and row["generation_seconds"] > 0 and row["reward_seconds"] > 0
        # Our count of generated tokens is TRL's logged mean completion length x completions.
        assert row["generated_tokens"] == round(lengths[row["step"]] * row["completions"])
        assert row["generation_tokens_per_second"] == pytest.approx(
            row["generated_tokens"] / row["generation_seconds"], rel=1e-3
        )
        parts = sum(row[f"{p}_seconds"] for p in ("generation", "reward", "scoring", "update"))
        assert parts == pytest.approx(row["step_seconds"], abs=1e-5)
    assert summary["engine"] == "hf" and metrics["generation_engine"] == "hf"
    assert summary["steps"] == STEPS and summary["generated_tokens"] == sum(r["generated_tokens"] for r in rows)
    assert sum(summary["share"].values()) == pytest.approx(1.0, abs=1e-3) and summary["share"]["generation"] > 0
    # The updates alone have their own MFU figures (posttrain.training.flops) over the same tokens and FLOPs.
    assert metrics["update_seconds"] == pytest.approx(sum(r["update_seconds"] for r in rows), abs=1e-2)
    assert metrics["update_seconds"] < metrics["mfu_basis"]["seconds"] and "update_mfu" in metrics
    assert grpo_result.metrics["rollout_timing.share.generation"] == summary["share"]["generation"]
    assert grpo_result.metrics["rollout_timing.generation_tokens_per_second"] > 0
    names = {name for name, _, _ in series_metrics(metrics)}
    assert {
        "rollout_steps/generation_seconds",
        "rollout_steps/update_seconds",
        "rollout_steps/generated_tokens",
    } <= names


def test_grpo_stage_fails_naming_a_raising_reward(project, grpo_result, monkeypatch) -> None:
    from posttrain.scoring import rewards
    from stages import grpo

    def flaky(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        raise KeyError("no such column")

    monkeypatch.setitem(rewards.REWARDS, "flaky", flaky)
    params, layout = project
    raw = copy.deepcopy(tiny_raw(DPO_GRPO))
    raw["grpo"]["rewards"] = [{"name": "exact_match", "weight": 1.0}, {"name": "flaky", "weight": 1.0}]
    raw["grpo"]["eval_items"] = 1
    with pytest.raises(StageError, match="reward function 'flaky' failed: KeyError"):
        grpo.run(parse_params(raw), layout)


def test_dpo_passes_a_lora_adapter_on_and_grpo_continues_it(project, tmp_path) -> None:
    """dpo.lora with handoff pass_on writes an adapter on the sft base (reference = that base);
    grpo.lora picks the same adapter up, trains it further and merges it into a full model."""
    import shutil

    from safetensors.torch import load_file

    from posttrain.models.lora import is_adapter_folder
    from stages import dpo, grpo

    _, source = project
    layout = Layout(tmp_path / "lora")
    shutil.copytree(source.root / "artifacts" / "data", layout.root / "artifacts" / "data")
    shutil.copytree(source.model("sft"), layout.model("sft"))
    raw = tiny_raw(DPO_GRPO)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    raw["dpo"]["lora"] = {**lora, "handoff": "pass_on"}
    raw["dpo"]["pairs"] = "offline"
    raw["grpo"]["lora"] = {**lora, "handoff": "merge"}
    params = parse_params(raw)

    dpo.run(params, layout)
    assert is_adapter_folder(layout.model("dpo"))
    dpo_adapter = load_file(layout.model("dpo") / "adapter_model.safetensors")
    assert dpo_adapter and all("lora_" in key for key in dpo_adapter)

    grpo.run(params, layout)
    assert not is_adapter_folder(layout.model("grpo"))
    merged = load_file(layout.model("grpo") / "model.safetensors")
    assert merged and not [key for key in merged if "lora" in key]
    assert verify_model_folder(layout.model("grpo"))["stage"] == "grpo"
