"""Generation engines against the libraries they drive: the shape of TRL's and transformers' code that
posttrain.scoring.engines and posttrain.training.rollout_timing rely on (these fail when a TRL or
transformers upgrade moves it), and a real GRPO run whose rollouts go through continuous batching."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from helpers.projects import DPO_GRPO, STEPS, build_trained_input_project
from helpers.tiny import tiny_raw

from posttrain.config import ENGINE_TRAINER_KEYS, parse_params


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_trl_grpo_methods_the_timing_wraps_keep_their_shape() -> None:
    from trl import GRPOTrainer

    # posttrain.training.rollout_timing.timed_trainer overrides these and passes the arguments through.
    assert parameters(GRPOTrainer._generate) == ["self", "prompts"]
    assert parameters(GRPOTrainer._calculate_rewards) == [
        "self",
        "inputs",
        "prompts",
        "completions",
        "completion_ids_list",
    ]
    assert parameters(GRPOTrainer._generate_and_score_completions) == ["self", "inputs"]
    # `_generate` returns 8 values, completion_ids second and tool_mask third (rollout_timing.generated_tokens).
    source = inspect.getsource(GRPOTrainer._generate)
    assert (
        "return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images"
        in source
    )


def test_trl_and_transformers_have_the_engine_switches_we_set() -> None:
    from transformers import GenerationMixin
    from transformers.generation import ContinuousBatchingConfig
    from trl import GRPOConfig
    from trl.generation.vllm_generation import VLLMGeneration

    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(ENGINE_TRAINER_KEYS) <= grpo_fields  # what engine_fields sets, and the trainer keys refused
    assert {"seed", "page_size", "num_blocks", "max_memory_percent"} <= {
        f.name for f in dataclasses.fields(ContinuousBatchingConfig)
    }
    assert {"inputs", "generation_config", "continuous_batching_config", "progress_bar"} <= set(
        parameters(GenerationMixin.generate_batch)
    )
    # The vllm engine (never run here: no CUDA, no vLLM) builds TRL's VLLMGeneration and sets these.
    init = parameters(VLLMGeneration.__init__)
    for name in ("model", "accelerator", "processing_class", "mode", "server_base_url", "gpu_memory_utilization",
                 "enable_sleep_mode", "logprobs", "temperature", "max_completion_length"):  # fmt: skip
        assert name in init, name
    assert parameters(VLLMGeneration.generate)[:4] == ["self", "prompts", "images", "num_generations"]
    source = inspect.getsource(VLLMGeneration.generate)
    assert "temperature = self.temperature" in source and "max_completion_length = self.max_completion_length" in source


@pytest.mark.e2e
def test_grpo_rollouts_through_continuous_batching(tmp_path) -> None:
    """`grpo.generation.engine: paged` on CPU: TRL's own continuous-batching path generates the rollouts,
    the held-out rewards and continual evaluation use the same engine, and the split is logged."""
    from stages import grpo

    raw = tiny_raw(DPO_GRPO)
    raw["grpo"]["generation"] = {"engine": "paged"}
    raw["grpo"]["eval_items"] = 4
    params = parse_params(raw)
    layout = build_trained_input_project(params, tmp_path, "dpo")
    result = grpo.run(params, layout)
    metrics = json.loads(layout.metrics("grpo").read_text())
    assert metrics["generation_engine"] == "paged" and metrics["rollout_timing"]["engine"] == "paged"
    assert metrics["steps"] == STEPS and [r["step"] for r in metrics["rollout_steps"]] == [1, 2, 3]
    lengths = {
        e["step"]: e["completions/mean_length"] for e in metrics["reward_curve"] if "completions/mean_length" in e
    }
    for row in metrics["rollout_steps"]:
        assert row["completions"] == 8 and row["generated_tokens"] == round(lengths[row["step"]] * 8)
    assert 0.0 <= metrics["greedy_reward_after"] <= 2.0
    assert result.metrics["rollout_timing.share.generation"] > 0
