"""bench/bare_trl.py mirrors the pipeline without importing it: its schedule shapes, its defaults and
its TRL keyword precedence must agree with posttrain's (a drift would make the bare-vs-stage
comparison of bench/throughput.py compare different runs)."""

from __future__ import annotations

import dataclasses

import pytest

from bench import bare_trl
from posttrain.config import ScheduleConfig, TrainerArgs, TrainStageConfig
from posttrain.training.schedules import SCHEDULES, lr_multiplier

CONFIGS = [
    {},
    {"warmup_fraction": 0.0},
    {"warmup_fraction": 0.1, "decay_fraction": 0.3, "min_lr_ratio": 0.1},
    {"warmup_fraction": 0.05, "decay_fraction": 0.2, "cooldown_fraction": 0.3, "constant_ratio": 0.4},
    {"warmup_fraction": 0.2, "decay_fraction": 0.0, "cooldown_fraction": 0.0, "min_lr_ratio": 0.6},
]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("total", [1, 7, 30, 101])
def test_schedule_matches_posttrain(name: str, overrides: dict, total: int) -> None:
    cfg = ScheduleConfig(name=name, **overrides)
    plain = {"name": name, **overrides}
    for step in range(total + 1):
        assert bare_trl.lr_multiplier(step, total, plain) == pytest.approx(lr_multiplier(step, total, cfg), abs=1e-12)


def test_defaults_match_posttrain_config() -> None:
    assert bare_trl.TRAINER_DEFAULTS == TrainerArgs().model_dump()
    assert bare_trl.SCHEDULE_DEFAULTS == ScheduleConfig().model_dump()
    assert bare_trl.MAX_LENGTH_DEFAULT == TrainStageConfig().max_length


def test_section_settings_fills_defaults_and_refuses_what_it_cannot_mirror() -> None:
    params = {"model": {"base": "scratch"}, "sft": {"trainer": {"learning_rate": 5e-4}, "schedule": {"name": "wsd"}}}
    section = bare_trl.section_settings(params, "sft", max_steps=7)
    assert section["trainer"]["max_steps"] == 7 and section["trainer"]["learning_rate"] == 5e-4
    assert section["trainer"]["per_device_train_batch_size"] == 16
    assert section["schedule"]["warmup_fraction"] == 0.05
    grpo = bare_trl.section_settings({"grpo": {"num_generations": 4}}, "grpo", None)
    assert grpo["num_generations"] == 4 and grpo["rewards"] == [{"name": "exact_match", "weight": 1.0}]
    for params, stage in [
        ({"sft": {"lora": {"r": 8}}}, "sft"),
        ({"model": {"base": "some/hub-id"}}, "pretrain"),
        ({"dpo": {"pairs": "on_policy"}}, "dpo"),
        ({"sft": {"schedule": {"name": "step"}}}, "sft"),
    ]:
        with pytest.raises(SystemExit):
            bare_trl.section_settings(params, stage, None)


def test_trl_kwargs_precedence(tmp_path) -> None:
    @dataclasses.dataclass
    class FakeConfig:
        max_length: int = 1024
        beta: float = 0.0
        use_vllm: bool = False

    section = {"trainer": {"beta": 0.5, "use_vllm": True}, "max_length": 32, "gradient_checkpointing": True}
    runtime = {"use_cpu": True, "bf16": False, "fp16": False, "seed": 1, "data_seed": 1,
               "activation_checkpointing": False}  # fmt: skip
    kwargs = bare_trl.trl_kwargs(FakeConfig, section, runtime, tmp_path, {"beta": 0.1, "completion_only_loss": True})
    assert kwargs["beta"] == 0.5  # params.yaml's trainer keys win over the stage's fields
    assert kwargs["completion_only_loss"] is True
    assert kwargs["max_length"] == 32
    assert kwargs["activation_checkpointing"] is True  # <stage>.gradient_checkpointing over the CPU default
    assert kwargs["use_vllm"] is False  # no vLLM on CPU, as the stage falls back
    assert kwargs["include_num_input_tokens_seen"] == "non_padding"


def test_throughput_steps_and_summary() -> None:
    from bench import throughput

    assert throughput.parse_steps("sft=300, grpo=60") == {"sft": 300, "grpo": 60}
    assert throughput.parse_steps(None) == {}
    for bad in ("sft", "merge=3", "sft=0", "sft=x"):
        with pytest.raises(SystemExit):
            throughput.parse_steps(bad)
    side = {"tokens_per_second": 100.0, "peak_rss_mb": 600.0, "final_train_loss": 1.5}
    reps = [{"bare": side, "stage": {**side, "tokens_per_second": t, "peak_rss_mb": 630.0}} for t in (97.0, 93.0)]
    summary = throughput.summarise(reps)
    assert summary["tokens_per_second_ratio_median"] == 0.95 and summary["throughput_target_met"]
    assert summary["peak_rss_ratio_median"] == 1.05
    assert summary["identical_final_loss"] and summary["final_losses"] == [1.5]


def test_conversational_mixtures_reach_trl_as_the_stage_gives_them(tmp_path) -> None:
    """SFT `messages` as TRL's lists with assistant-only loss; DPO/GRPO prompts through the chat template and
    chosen/rejected as their assistant turn's text (what posttrain.training.inputs gives the trainers)."""
    import json

    import pandas as pd
    from helpers.tiny import char_tokenizer

    from posttrain.data.formats import canonical_json
    from posttrain.models import chat_template
    from posttrain.training.inputs import chat_mixture_row

    def write(stage: str, rows: list[dict]) -> None:
        folder = tmp_path / "artifacts" / "data" / "mixtures" / stage
        folder.mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(folder / "train.parquet")
        (folder / "manifest.json").write_text(json.dumps({"conversational": True}))

    user = [{"role": "user", "content": "12+34="}]
    answer = [{"role": "assistant", "content": "46"}]
    write("sft", [{"id": "a", "domain": "add", "messages": canonical_json(user + answer)}])
    pair = {"id": "p", "prompt": canonical_json(user), "chosen": canonical_json(answer),
            "rejected": canonical_json([{"role": "assistant", "content": "47"}])}  # fmt: skip
    write("dpo", [pair])
    data, fields = bare_trl.sft_data(tmp_path)
    assert data[0]["messages"] == user + answer
    assert fields == {"assistant_only_loss": True, "completion_only_loss": False}

    tokenizer = char_tokenizer()
    chat_template.install(tokenizer, "chatml", tmp_path)
    bare = bare_trl.prompt_rows(tmp_path, "dpo", ["prompt", "chosen", "rejected"], tokenizer)[0]
    staged = chat_mixture_row(tokenizer, pair, "dpo mixture")
    assert {k: bare[k] for k in ("prompt", "chosen", "rejected")} == {
        k: staged[k] for k in ("prompt", "chosen", "rejected")
    }
    assert bare["prompt"].endswith("<|im_start|>assistant\n") and bare["chosen"] == "46"


def test_grpo_tokens_are_counted_as_the_stage_counts_them(tmp_path) -> None:
    @dataclasses.dataclass
    class GRPOConfig:
        max_length: int = 1024

    runtime = {"use_cpu": True, "bf16": False, "fp16": False, "seed": 1, "data_seed": 1}
    kwargs = bare_trl.trl_kwargs(GRPOConfig, {"trainer": {}, "max_length": 32}, runtime, tmp_path, {})
    # As posttrain.training.trl_config: GRPO's batches have no input_ids; TRL's num_tokens log counts them.
    assert kwargs["include_num_input_tokens_seen"] == "no"
