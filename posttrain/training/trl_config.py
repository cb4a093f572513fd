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
from posttrain.training.flops import ModelShape, training_memory_gb
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


# Share of the GPU's memory the estimated step may use before gradient checkpointing turns on by default.
MEMORY_HEADROOM = 0.9


def memory_levers(
    stage: str,
    section: TrainStageConfig,
    runtime: Runtime,
    *,
    packable: bool,
    estimated_gb: float | None = None,
    config_name: str = "config",
) -> dict[str, Any]:
    """Packing and activation checkpointing of a stage: params first, else the device's default (pure).

    packing      `<stage>.packing`; null: on with CUDA for the SFTTrainer stages (`packable`: TRL's config
                 has packing), as TRL's BFD, which makes the batches padding-free; off on CPU.
    checkpoint   `<stage>.gradient_checkpointing`; null: off, except with CUDA when the step's estimated
                 memory (`estimated_gb`, flops.training_memory_gb) exceeds MEMORY_HEADROOM of the GPU's.
                 On CPU Runtime.trainer_fields already turns it off.
    """
    fields: dict[str, Any] = {}
    packing = section.packing if section.packing is not None else (runtime.device == "cuda" and packable)
    if packing:
        if not packable:
            raise ParamsError(f"{stage}.packing: got true, but TRL's {config_name} has no packing; expected false")
        fields["packing"] = True
        fields["packing_strategy"] = "bfd"  # best-fit decreasing: padding-free batches (TRL sets padding_free)
    if section.gradient_checkpointing is not None:
        fields["activation_checkpointing"] = section.gradient_checkpointing
    elif runtime.device == "cuda":
        limit = MEMORY_HEADROOM * runtime.memory_gb if runtime.memory_gb else None
        fields["activation_checkpointing"] = bool(limit and estimated_gb and estimated_gb > limit)
    return fields


def trl_config(
    config_cls: type,
    stage: str,
    section: TrainStageConfig,
    runtime: Runtime,
    output_dir: Path,
    shape: ModelShape | None = None,
    **stage_fields: Any,
) -> Any:
    """Build `config_cls` (SFTConfig, DPOConfig, GRPOConfig, ...) for `stage`.

    Precedence, lowest first: our defaults (no reporting, step checkpoints, runtime device and
    precision, the device's packing and checkpointing defaults from `memory_levers`), the stage's own
    fields (`stage_fields`, e.g. beta for DPO), then every key of `<stage>.trainer` in params.yaml,
    which is passed through as is so TRL's own checks run. `shape` (the model's, flops.ModelShape)
    feeds the memory estimate behind the checkpointing default with CUDA.
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
    estimated_gb = None
    if shape is not None and runtime.device == "cuda" and section.gradient_checkpointing is None:
        pairs = 2 if config_cls.__name__ == "DPOConfig" else 1  # chosen and rejected in one batch
        # GRPO's rows are prompt (max_length at most) + sampled completion.
        length = section.max_length + int(stage_fields.get("max_completion_length") or 0)
        micro_batch = int(user.get("per_device_train_batch_size", 1)) * length * pairs
        estimated_gb = training_memory_gb(shape, micro_batch, reference_copies=int(config_cls.__name__ == "DPOConfig"))
    kwargs.update(
        memory_levers(
            stage, section, runtime, packable="packing" in known, estimated_gb=estimated_gb,
            config_name=config_cls.__name__,
        )
    )  # fmt: skip
    kwargs.update(stage_fields)
    kwargs.update(user)
    renamed = "activation_checkpointing" not in known and "gradient_checkpointing" in known
    if "activation_checkpointing" in kwargs and renamed:
        # An older transformers (e.g. 5.17 on the lent GPU machine) may know the switch by its old name only.
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
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
