"""A training stage run: `TrainingJob` describes it, `run_training` trains, measures and writes it.

A trainer stage reads as: load the input model (posttrain.models.loading) -> its data
(posttrain.training.inputs) -> a `TrainingJob` -> `run_training`. Everything a trainer stage has in
common happens in this package, once:

    trl_config.py    our stage section -> SFTConfig / DPOConfig / GRPOConfig; LR schedules
    data.py          training mixture (columns and lengths checked), first N validation items per domain
    callbacks.py     NaN guard, progress log, continual evaluation, SIGTERM preemption
    checkpoints.py   checkpoint key (code, params, inputs), COMPLETE marker, resume (a finished run
                     trains 0 steps), cleaning, trainer state of a checkpoint
    outputs.py       model folder written atomically with lineage.json; metrics JSON; plots

A stage's own measurements of the trained model (DPO's held-out margins, GRPO's rewards) are
`TrainingJob.measure` hooks: they run on the trained model before the one write of the metrics.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PrinterCallback
from trl import SFTConfig, SFTTrainer

from posttrain.config import Params, TrainStageConfig
from posttrain.errors import ParamsError, StageError, resource_error
from posttrain.io import json_hash
from posttrain.layout import Layout
from posttrain.lineage import parent_entry
from posttrain.models.build import apply_kernels, count_parameters
from posttrain.runtime import Runtime, is_main_process, world_size
from posttrain.scoring.engines import stage_engine
from posttrain.spec import StageSpec
from posttrain.stage import StageResult, flat_metrics
from posttrain.training.adaptive_mixing import OnlineMixing
from posttrain.training.callbacks import ContinualEvaluation, Preemption, all_finite, make_callbacks
from posttrain.training.checkpoints import (
    average_last_checkpoints,
    find_resume_checkpoint,
    key_components,
    key_of,
    prepare_folder,
    tokens_at,
)
from posttrain.training.flops import ModelShape, device_peak, throughput_metrics, trainer_passes
from posttrain.training.inputs import load_validation_sets
from posttrain.training.no_learning import Check, after_training_checks, enforce, weights_digest
from posttrain.training.outputs import write_model_output
from posttrain.training.trl_config import trl_config, with_schedule

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from posttrain.models.lora import AdapterSetup

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    """What a `TrainingJob.measure` hook sees: the trained model and the run's metrics so far."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    metrics: dict[str, Any]
    final_checkpoint: Path  # checkpoints/<stage>-<key>/checkpoint-<last step> (the Trainer saves the last step)
    artifacts: list[Path] = field(default_factory=list)  # files a hook wrote, recorded with the stage


# Extra metrics measured on the trained model, merged into metrics.json before its single write.
MeasureHook = Callable[[TrainedRun], dict[str, Any]]


@dataclass
class TrainingJob:
    """One training stage run, as the stage module describes it.

    The trainer is `trainer_cls(model=, args=, train_dataset=, processing_class=, callbacks=,
    **trainer_kwargs)`, which fits SFTTrainer, DPOTrainer and GRPOTrainer alike.
    """

    spec: StageSpec  # the stage's identity: name, parents (their content hashes go into the checkpoint key)
    section: TrainStageConfig
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    train_dataset: datasets.Dataset
    # Mixture manifest: its hash goes into lineage.json and the checkpoint key.
    data_manifest: Path | None
    config_cls: type | None = None  # default trl.SFTConfig
    trainer_cls: type | None = None  # default trl.SFTTrainer
    config_fields: dict[str, Any] = field(default_factory=dict)  # stage-specific TRL config fields
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. reward_funcs, ref_model
    key_inputs: dict[str, Any] = field(default_factory=dict)  # anything else that determines the result
    eval_domains: list[str] | None = None  # continual-evaluation domains (None: every data.domains entry)
    lineage_extra: dict[str, Any] = field(default_factory=dict)
    metrics_extra: dict[str, Any] = field(default_factory=dict)
    # The model's LoRA adapter, from posttrain.models.loading.load_for_training (None: full fine-tuning).
    adapter: AdapterSetup | None = None
    # Run on the trained model by global rank 0, in order; what they return is merged into metrics.json.
    measure: list[MeasureHook] = field(default_factory=list)
    # Seconds of the optimizer updates alone within trainer.train(), when a stage splits its time (GRPO:
    # generation and rewards apart); called after training. Adds update_mfu to the MFU fields (flops.py).
    update_seconds: Callable[[], float | None] | None = None
    # What the stage measured before training about whether it can learn (GRPO's zero-variance groups),
    # already enforced by the stage; recorded with the checks after training (posttrain.training.no_learning).
    learning_checks: list[Check] = field(default_factory=list)


def peak_gpu_mb(runtime: Runtime) -> float | None:
    """Peak GPU memory held by tensors in this process (torch's allocator), None off CUDA."""
    if runtime.device != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def run_training(job: TrainingJob, params: Params, layout: Layout, runtime: Runtime) -> StageResult:
    """Train, resuming from the newest complete checkpoint; write model, lineage, metrics and plots."""
    stage, section = job.spec.name, job.section
    if section.lora is not None and job.adapter is None:
        raise ParamsError(
            f"{stage}.lora: set, but stage {stage} does not load its model through posttrain.models.loading "
            "(LoRA needs a pretrained input model); expected null here"
        )
    positions = getattr(job.model.config, "max_position_embeddings", None)
    if positions is not None and section.max_length > positions:
        raise ParamsError(
            f"{stage}.max_length: got {section.max_length}, expected at most the model's max_position_embeddings "
            f"({positions})"
        )
    parents = [parent_entry(layout.model(p), layout.root) for p in job.spec.parents]
    # The stage's generation engine (continual evaluation here; GRPO's rollouts and DPO's samples in their stages).
    engine, engine_options = stage_engine(params, stage, runtime.device)
    # The key covers code, params and inputs (training.checkpoints): another run's checkpoint is never resumed.
    components = key_components(
        job.spec,
        params,
        inputs={
            "section": section.model_dump(mode="json"),
            "seed": runtime.seed,
            "parents": [p["content_hash"] for p in parents],
            "data_manifest": json_hash(job.data_manifest) if job.data_manifest else None,
            "device": runtime.device,
            "precision": runtime.precision,
            "threads": runtime.num_threads,
            # More processes = a larger global batch: another run, never resumed from a 1-process checkpoint.
            "world_size": world_size(),
            # Another engine samples other rollouts and may score continual evaluation differently.
            "generation_engine": engine,
            # A continued adapter is only as good as its base: the base's hash decides the run too.
            **({"adapter_base": job.adapter.base["content_hash"]} if job.adapter else {}),
            **job.key_inputs,
        },
    )
    ckpt_dir = layout.checkpoints(stage, key_of(components))
    prepare_folder(ckpt_dir, components, clean=is_main_process())
    ckpt_shown = ckpt_dir.relative_to(layout.root).as_posix() if ckpt_dir.is_relative_to(layout.root) else str(ckpt_dir)
    # Only rank 0 deletes half-written checkpoints (the others skip them the same way).
    resume = find_resume_checkpoint(ckpt_dir, remove_incomplete=is_main_process())

    # Online mixing (`mixtures.<stage>.adaptive`): probes come out of the step budget, so fewer main steps.
    online = OnlineMixing.for_stage(
        stage, params.mixtures.get(stage), layout, section.trainer.max_steps, runtime.seed, job.tokenizer
    )
    shape = ModelShape.of(job.model)
    config = trl_config(job.config_cls or SFTConfig, stage, section, runtime, ckpt_dir, shape, **job.config_fields)
    apply_kernels(job.model, runtime.kernels)
    if online:
        config.max_steps = online.main_steps
    domains = job.eval_domains or section.eval_domains or list(params.data.domains)
    evaluation = ContinualEvaluation(
        job.tokenizer,
        load_validation_sets(layout, domains, section.eval_items, job.tokenizer),
        section.eval_every,
        engine=engine,
        options=engine_options,
    )
    preemption = Preemption()
    trainer_cls = job.trainer_cls or SFTTrainer
    trainer = with_schedule(online.trainer_class(trainer_cls) if online else trainer_cls)(
        model=job.model,
        args=config,
        train_dataset=job.train_dataset,
        processing_class=job.tokenizer,
        callbacks=make_callbacks(stage, evaluation, preemption) + ([online] if online else []),
        schedule=section.schedule,
        **job.trainer_kwargs,
    )
    # ProgressLog replaces the raw log dicts the Trainer prints when tqdm is off.
    trainer.remove_callback(PrinterCallback)
    model = trainer.model
    log.info(
        "%s: %d parameters, %d training examples, checkpoints in %s",
        stage,
        count_parameters(model),
        len(job.train_dataset),
        ckpt_dir,
    )

    # Scored on the input model: the same "before" whether or not the run resumes.
    before = evaluation.record(0, model)
    policy = section.no_learning
    digest_before = weights_digest(model) if policy.unchanged_weights else None
    if resume is not None:
        log.info("%s: resuming from %s (step %s)", stage, resume, resume.name.split("-")[-1])
        evaluation.load(resume)
    started = time.perf_counter()
    with preemption.installed():
        try:
            output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except Exception as error:
            # Out of memory or disk: an actionable, non-retryable StageError instead of a traceback.
            exhausted = resource_error(error, stage)
            if exhausted is None:
                raise
            raise exhausted from error
    seconds = time.perf_counter() - started
    training_seconds = max(seconds - evaluation.seconds_in_training, 1e-9)
    state = trainer.state
    if preemption.requested:
        raise StageError(
            f"stage {stage}: stopped by SIGTERM at step {state.global_step}; checkpoint saved in {ckpt_dir}, "
            "rerun the stage to resume from it"
        )
    if not all_finite(model):
        raise StageError(f"stage {stage}: final weights contain NaN/inf; no model written")
    averaged = average_last_checkpoints(model, ckpt_dir, section.average_last) if section.average_last else None
    if averaged:  # the model is now the average: score it, not the last step's weights
        log.info("%s: model = average of %s", stage, ", ".join(averaged))
        after = evaluation.record(state.global_step, model)
    else:
        after = evaluation.at(state.global_step) or evaluation.record(state.global_step, model)

    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    digest_after = weights_digest(model) if policy.unchanged_weights else None
    checks = after_training_checks(policy, losses, digest_before, digest_after)
    # Before anything is written: with action fail, a stage that learned nothing leaves no model behind.
    learning = enforce(stage, policy, checks, earlier=job.learning_checks)
    steps_run = state.global_step - (int(resume.name.split("-")[-1]) if resume else 0)
    # GRPO: TRL logs the tokens it processed (prompt + completion) as `num_tokens`, cumulative.
    logged_tokens = max((int(e["num_tokens"]) for e in state.log_history if "num_tokens" in e), default=0)
    tokens_seen = state.num_input_tokens_seen or logged_tokens
    tokens_run = tokens_seen - (tokens_at(resume) if state.num_input_tokens_seen else 0)
    train_passes, extra_forwards = trainer_passes(trainer)
    update_seconds = job.update_seconds() if job.update_seconds else None
    throughput = throughput_metrics(
        shape, section.max_length, tokens_run, training_seconds, device_peak(runtime.device, runtime.device_name,
        runtime.peak_tflops), train_passes=train_passes, extra_forwards=extra_forwards, update_seconds=update_seconds,
        devices=config.world_size,
    )  # fmt: skip
    metrics: dict[str, Any] = {
        "stage": stage,
        "steps": state.global_step,
        "steps_this_run": steps_run,
        "resumed_from_step": int(resume.name.split("-")[-1]) if resume else None,
        "seconds": round(seconds, 2),  # trainer.train(), continual evaluation included
        "eval_seconds": round(evaluation.seconds_in_training, 2),  # of which continual evaluation
        # Rates over training alone (`seconds` - `eval_seconds`), comparable with a bare TRL run.
        "steps_per_second": round(steps_run / training_seconds, 3),
        "tokens_seen": tokens_seen,
        "tokens_per_second": round(tokens_run / training_seconds, 1),
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": losses[-1] if losses else None,
        # Mean over this run's steps (None when it resumed a finished run and trained none).
        "train_loss_mean": output.training_loss if steps_run else None,
        "val_before": before,
        "val_after": after,
        "continual_eval": evaluation.series,
        "parameters": count_parameters(model),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_examples": len(job.train_dataset),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": peak_gpu_mb(runtime),
        # Model FLOPs per token, achieved TFLOP/s and MFU over the same training seconds (posttrain.training.flops).
        **throughput,
        "device": runtime.device,
        "device_name": runtime.device_name,
        "precision": runtime.precision,
        "threads": runtime.num_threads,
        # The GPU defaults as resolved (docs/gpu.md); TRL's own names.
        "gpu_settings": {
            "tf32": runtime.tf32,
            "attn_implementation": runtime.attn_implementation,
            "kernels": runtime.kernels,
            "torch_compile": runtime.compile,
            "packing": bool(getattr(config, "packing", False)),
            "padding_free": bool(getattr(trainer, "padding_free", False)),
            "activation_checkpointing": bool(
                config.activation_checkpointing
                if getattr(config, "activation_checkpointing", None) is not None
                else getattr(config, "gradient_checkpointing", False)
            ),
        },
        "generation_engine": engine,
        "checkpoints": ckpt_shown,
        "world_size": config.world_size,
        "averaged_checkpoints": averaged,
        "no_learning": learning,
        **job.metrics_extra,
    }
    # FSDP / DeepSpeed hold shards: gather the full weights (a collective, so every rank calls it).
    state_dict = (
        trainer.accelerator.get_state_dict(trainer.model)
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
        else None
    )
    if not trainer.accelerator.is_main_process:
        # Global rank 0 writes the model, lineage and metrics; the others must not race on its renames.
        return StageResult(metrics=flat_metrics(metrics), model_dir=None)
    run = TrainedRun(
        model=model,
        tokenizer=job.tokenizer,
        metrics=metrics,
        final_checkpoint=ckpt_dir / f"checkpoint-{state.global_step}",
    )
    for hook in job.measure + ([online.measure] if online else []):
        metrics.update(hook(run))
    distributed = {"world_size": config.world_size, "type": str(trainer.accelerator.distributed_type.value)}
    return write_model_output(
        stage,
        job.model,
        job.tokenizer,
        params=params,
        layout=layout,
        section=section,
        parents=parents,
        data_manifest=job.data_manifest,
        metrics=metrics,
        lineage_extra={"checkpoints": ckpt_shown, "distributed": distributed, **job.lineage_extra},
        adapter=job.adapter,
        state_dict=state_dict,
        artifacts=run.artifacts,
    )
