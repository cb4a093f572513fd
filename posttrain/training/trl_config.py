"""Our stage section -> TRL's config class (SFTConfig, DPOConfig, GRPOConfig), in one place.

`<stage>.trainer` keys pass straight through so TRL's own checks run; unknown keys are ParamsErrors
naming the key and the closest known ones. `with_schedule` drives any Trainer's LR schedule from
`posttrain.training.schedules`.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from posttrain.config import EngineConfig, ScheduleConfig, TrainStageConfig
from posttrain.errors import ParamsError
from posttrain.runtime import Runtime
from posttrain.training.schedules import build_scheduler


def unknown_trainer_keys(config_cls: type, stage: str, trainer: dict[str, Any]) -> list[str]:
    """One line per `<stage>.trainer` key that TRL's `config_cls` does not have (with close names)."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    lines = []
    for key, value in trainer.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            lines.append(
                f"{stage}.trainer.{key}: unknown setting for TRL's {config_cls.__name__} (value {value!r}){hint}"
            )
    return lines


def trl_config(
    config_cls: type,
    stage: str,
    section: TrainStageConfig,
    runtime: Runtime,
    output_dir: Path,
    **stage_fields: Any,
) -> Any:
    """Build `config_cls` (SFTConfig, DPOConfig, GRPOConfig, ...) for `stage`.

    Precedence, lowest first: our defaults (no reporting, step checkpoints, runtime device and
    precision), the stage's own fields (`stage_fields`, e.g. beta for DPO), then every key of
    `<stage>.trainer` in params.yaml, which is passed through as is so TRL's own checks run.
    """
    known = {f.name for f in dataclasses.fields(config_cls)}
    user = section.trainer.model_dump()
    unknown = unknown_trainer_keys(config_cls, stage, user)  # also run by `posttrain run --set`
    if unknown:
        raise ParamsError(unknown[0])
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "report_to": "none",  # MLflow is recorded by posttrain.pipeline.entry after the stage, not by the Trainer
        "save_strategy": "steps",
        "logging_strategy": "steps",
        "logging_first_step": True,
        # The default replaces NaN/inf losses in the logs by the running mean: it would hide a diverged run.
        "logging_nan_inf_filter": False,
        # GRPO's Trainer batches are prompt rows before generation (no `input_ids`): transformers could
        # count nothing and warned once per step; GRPO's tokens come from TRL's own `num_tokens` log.
        "include_num_input_tokens_seen": "no" if config_cls.__name__ == "GRPOConfig" else "non_padding",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **runtime.trainer_fields(),
    }
    if "max_length" in known:
        kwargs["max_length"] = section.max_length
    if section.gradient_checkpointing is not None:
        kwargs["activation_checkpointing"] = section.gradient_checkpointing
    if section.packing:
        if "packing" not in known:
            raise ParamsError(
                f"{stage}.packing: got true, but TRL's {config_cls.__name__} has no packing; expected false"
            )
        kwargs["packing"] = True
    kwargs.update(stage_fields)
    kwargs.update(user)
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ParamsError(f"{stage}.trainer: TRL's {config_cls.__name__} rejected the settings: {error}") from None


def engine_fields(engine: str, options: EngineConfig, paged_cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """GRPOConfig fields that make TRL's GRPOTrainer generate its rollouts with `engine`
    (posttrain.scoring.engines; resolved there, so an engine that is not installed never gets here).

    hf is TRL's default path (`generate`); paged is TRL's `use_transformers_continuous_batching`
    (transformers' `generate_batch`) with the KV cache sized by `paged_cache`
    (posttrain.scoring.engines.paged_cache); vllm is TRL's `use_vllm` in `vllm_mode`, with sleep
    mode in colocate when `vllm_sleep_mode` is set.
    """
    if engine == "hf":
        return {}
    if engine == "paged":
        return {"use_transformers_continuous_batching": True, "transformers_continuous_batching_config": paged_cache}
    if engine == "vllm":
        fields: dict[str, Any] = {
            "use_vllm": True,
            "vllm_mode": options.vllm_mode,
            "vllm_gpu_memory_utilization": options.vllm_gpu_memory_utilization,
            "vllm_enable_sleep_mode": options.vllm_sleep_mode and options.vllm_mode == "colocate",
        }
        if options.vllm_server_url:
            fields["vllm_server_base_url"] = options.vllm_server_url
        return fields
    raise ValueError(f"unknown engine {engine!r}")


def with_schedule(trainer_cls: type) -> type:
    """A subclass of `trainer_cls` whose LR schedule comes from posttrain.training.schedules.

    Overriding `create_scheduler` (instead of passing `optimizers=(None, scheduler)`) lets the
    Trainer still build its optimizer with its own parameter groups, and still save and restore the
    scheduler's position in checkpoints. Construct it with the extra keyword `schedule=`.
    """

    class Scheduled(trainer_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, schedule: ScheduleConfig, **kwargs: Any) -> None:
            self.schedule_config = schedule
            super().__init__(*args, **kwargs)

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                self.lr_scheduler = build_scheduler(
                    optimizer or self.optimizer, self.schedule_config, num_training_steps
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
            # The Trainer checks max_steps only after an optimizer step: resumed from the final
            # checkpoint of a finished run, it would train step max_steps + 1 and change the model.
            if 0 < self.state.max_steps <= self.state.global_step:
                self.control.should_training_stop = True
                return None
            return super()._run_epoch(*args, **kwargs)

    Scheduled.__name__ = Scheduled.__qualname__ = f"Scheduled{trainer_cls.__name__}"
    return Scheduled
