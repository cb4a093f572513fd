"""Trainer set-up shared by every training stage (pretrain, cpt, sft, dpo, grpo).

A stage builds its model, tokenizer and dataset, describes the run as a `TrainingJob`, and calls
`run_training`. Everything a trainer stage has in common happens here, once:

    setup_runtime        device, precision, torch threads, seeds
    trl_config           our stage section -> SFTConfig / DPOConfig / GRPOConfig (TrainerArgs
                         extras passed straight through; unknown keys are ParamsErrors)
    with_schedule        any Trainer class driven by posttrain.schedules
    callbacks            NonFiniteGuard (NaN/inf loss or weights stop the stage, nothing written),
                         ContinualEvaluation (per-domain val loss + greedy exact match series),
                         CheckpointMarker (COMPLETE written after a checkpoint is fully saved),
                         Preemption (SIGTERM saves a checkpoint and exits non-zero), ProgressLog
    checkpoints          checkpoints/<stage>-<key>/, key = hash of params + input content hashes;
                         resume from the newest COMPLETE checkpoint, half-written ones removed
    outputs              model folder written atomically with lineage.json; metrics JSON; PNG and
                         JSON of the continual-evaluation series

Public API (stable; DPO/GRPO stages use it):

    setup_runtime(compute, seed) -> Runtime
    trl_config(config_cls, stage, section, runtime, output_dir, **stage_fields) -> TRL config
    with_schedule(trainer_cls) -> trainer class taking `schedule=ScheduleConfig`
    read_mixture(layout, stage, columns) -> datasets.Dataset
    load_text_mixture / load_prompt_completion_mixture(layout, stage, tokenizer, section) -> Dataset
    check_lengths(texts, ids, tokenizer, max_length, on_too_long, where) -> None
    load_validation_sets(layout, domains, eval_items) -> dict[str, ValidationSet]
    evaluate_domains(model, tokenizer, sets) -> dict[str, dict[str, float | None]]
    checkpoint_key(...) / find_resume_checkpoint(folder) / COMPLETE_MARKER
    TrainingJob, run_training(job, params, layout, runtime) -> StageResult
    write_model_output(...) (no-op stages that only re-save a model, e.g. pretrain with a given base)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from transformers import TrainerCallback

from posttrain.config import ComputeConfig, Params, ParamsError, ScheduleConfig, TrainStageConfig, params_hash
from posttrain.entry import StageResult, resource_error
from posttrain.errors import DataError, StageError
from posttrain.launch import is_main_process, world_size
from posttrain.layout import Layout
from posttrain.lengths import check_completion_room
from posttrain.lineage import atomic_output_dir, json_hash, parent_entry, write_json_atomic, write_lineage
from posttrain.preflight import unknown_trainer_keys

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from posttrain.adapters import AdapterSetup

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
SERIES_FILE = "continual_eval.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# --------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Runtime:
    """Where and how a stage computes; `trainer_fields()` are the matching TrainingArguments."""

    device: Literal["cpu", "cuda"]
    precision: Literal["fp32", "bf16", "fp16"]
    num_threads: int
    seed: int

    def trainer_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "use_cpu": self.device == "cpu",
            # TRL defaults bf16=True; on CPU that is emulated (~7.5x slower) or refused.
            "bf16": self.precision == "bf16",
            "fp16": self.precision == "fp16",
            "seed": self.seed,
            "data_seed": self.seed,
        }
        if self.device == "cpu":
            # TRL turns activation checkpointing on by default: ~1.6x slower for small models.
            fields["activation_checkpointing"] = False
        return fields


def setup_runtime(compute: ComputeConfig, seed: int) -> Runtime:
    """Pick device and precision, set torch threads, seed every RNG. Call before building a model."""
    import datasets
    import torch
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    cuda = torch.cuda.is_available()
    if compute.device == "cuda" and not cuda:
        raise StageError("compute.device is 'cuda' but no CUDA device is visible; expected a GPU or device: auto/cpu")
    device: Literal["cpu", "cuda"] = (
        "cuda" if compute.device == "cuda" or (compute.device == "auto" and cuda) else "cpu"
    )
    precision: Literal["fp32", "bf16", "fp16"]
    if compute.precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    else:
        precision = compute.precision
    if device == "cpu" and precision == "fp16":
        raise ParamsError("compute.precision: got 'fp16' on CPU; expected auto, fp32 or bf16 there")
    if device == "cpu" and precision == "bf16":
        log.warning("compute.precision bf16 on CPU is emulated and several times slower than fp32")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = compute.num_threads or min(cores, 8)
    torch.set_num_threads(threads)
    set_seed(seed)
    hf_logging.disable_progress_bar()  # weight-loading and dataset-map bars flood DVC/Prefect logs
    datasets.disable_progress_bars()
    runtime = Runtime(device=device, precision=precision, num_threads=threads, seed=seed)
    log.info("runtime: device=%s precision=%s threads=%d seed=%d", device, precision, threads, seed)
    return runtime


# --------------------------------------------------------------------------- TRL config


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
        "report_to": "none",  # MLflow is recorded by posttrain.entry after the stage, not by the Trainer
        "save_strategy": "steps",
        "logging_strategy": "steps",
        "logging_first_step": True,
        # The default replaces NaN/inf losses in the logs by the running mean: it would hide a diverged run.
        "logging_nan_inf_filter": False,
        "include_num_input_tokens_seen": "non_padding",
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
    if kwargs.get("use_vllm"):
        kwargs["use_vllm"] = vllm_usable(stage, runtime)
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ParamsError(f"{stage}.trainer: TRL's {config_cls.__name__} rejected the settings: {error}") from None


def vllm_usable(stage: str, runtime: Runtime) -> bool:
    """`<stage>.trainer.use_vllm: true` holds only with CUDA and vLLM; otherwise TRL's own generation runs.

    vLLM is an optional extra (`pip install -e .[vllm]`); a recipe written for a GPU cluster must
    still run on a laptop, so its absence is a warning, not an error.
    """
    from trl.import_utils import is_vllm_available

    missing = [why for why, absent in (("no CUDA device", runtime.device != "cuda"),
                                       ("vllm not installed", not is_vllm_available())) if absent]  # fmt: skip
    if missing:
        log.warning("%s.trainer.use_vllm: %s; falling back to ordinary generation", stage, " and ".join(missing))
        return False
    return True


def with_schedule(trainer_cls: type) -> type:
    """A subclass of `trainer_cls` whose LR schedule comes from posttrain.schedules.

    Overriding `create_scheduler` (instead of passing `optimizers=(None, scheduler)`) lets the
    Trainer still build its optimizer with its own parameter groups, and still save and restore the
    scheduler's position in checkpoints. Construct it with the extra keyword `schedule=`.
    """

    class Scheduled(trainer_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, schedule: ScheduleConfig, **kwargs: Any) -> None:
            self.schedule_config = schedule
            super().__init__(*args, **kwargs)

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            from posttrain.schedules import build_scheduler

            if self.lr_scheduler is None:
                self.lr_scheduler = build_scheduler(
                    optimizer or self.optimizer, self.schedule_config, num_training_steps
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

    Scheduled.__name__ = Scheduled.__qualname__ = f"Scheduled{trainer_cls.__name__}"
    return Scheduled


# --------------------------------------------------------------------------- data


def read_mixture(layout: Layout, stage: str, columns: Sequence[str]) -> datasets.Dataset:
    """The stage's training mixture with exactly `columns` (DataError naming a missing column)."""
    import datasets
    import pandas as pd

    path = layout.mixture(stage) / "train.parquet"
    if not path.is_file():
        raise DataError(f"{path}: training mixture not found; run the mix stage first (python -m stages.mix)")
    frame = pd.read_parquet(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}, expected {list(columns)}")
    if frame.empty:
        raise DataError(f"{path}: the training mixture has no rows; expected at least one")
    for column in columns:
        bad = frame[column].isna()
        if bad.any():
            row = frame.index[bad][0]
            raise DataError(f"{path}: row {row} has an empty '{column}'; expected a string")
    return datasets.Dataset.from_pandas(frame[list(columns)], preserve_index=False)


def check_lengths(
    texts: Sequence[str],
    ids: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    on_too_long: Literal["truncate", "refuse"],
    where: str,
) -> int:
    """Count examples longer than `max_length` tokens (EOS included); with `refuse`, fail on the first.

    TRL truncates silently; a cut example loses its answer or its EOS, so by default we refuse.
    """
    lengths = [len(ids_) + 1 for ids_ in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long and on_too_long == "refuse":
        i = too_long[0]
        raise DataError(
            f"{where}: {len(too_long)} example(s) longer than max_length={max_length} tokens, first id {ids[i]!r} "
            f"with {lengths[i]} tokens ({texts[i][:60]!r}); raise max_length or set on_too_long: truncate"
        )
    if too_long:
        log.warning("%s: %d example(s) longer than %d tokens are truncated", where, len(too_long), max_length)
    return len(too_long)


def load_text_mixture(
    layout: Layout, stage: str, tokenizer: PreTrainedTokenizerBase, section: TrainStageConfig
) -> datasets.Dataset:
    """Language-modelling data: the mixture's `text` column, lengths checked (TRL appends EOS)."""
    data = read_mixture(layout, stage, ["id", "text"])
    where = str(layout.mixture(stage) / "train.parquet")
    check_lengths(data["text"], data["id"], tokenizer, section.max_length, section.on_too_long, where)
    return data.select_columns(["text"])


def load_prompt_completion_mixture(
    layout: Layout, stage: str, tokenizer: PreTrainedTokenizerBase, section: TrainStageConfig
) -> datasets.Dataset:
    """Prompt-completion data (`prompt`, `completion`), lengths of prompt + completion + EOS checked."""
    data = read_mixture(layout, stage, ["id", "prompt", "completion"])
    where = str(layout.mixture(stage) / "train.parquet")
    texts = [p + c for p, c in zip(data["prompt"], data["completion"], strict=False)]
    check_lengths(texts, data["id"], tokenizer, section.max_length, section.on_too_long, where)
    if section.on_too_long == "truncate":
        check_completion_room(data["prompt"], tokenizer, section.max_length, stage, where)
    return data.select_columns(["prompt", "completion"])


def mixture_manifest(layout: Layout, stage: str) -> Path:
    return layout.mixture(stage) / "manifest.json"


@dataclass
class ValidationSet:
    """First `eval_items` validation items of one domain: `text` for loss, `prompt`/`answer` for exact match."""

    domain: str
    texts: list[str]
    prompts: list[str]
    answers: list[str]


def load_validation_sets(layout: Layout, domains: Sequence[str], eval_items: int) -> dict[str, ValidationSet]:
    """Per-domain validation sets; a domain without a val split is skipped with a warning."""
    import pandas as pd

    sets: dict[str, ValidationSet] = {}
    for domain in domains:
        path = layout.prepared_split(domain, "val")
        if not path.is_file():
            log.warning("continual evaluation: %s not found, domain %s skipped", path, domain)
            continue
        frame = pd.read_parquet(path, columns=["text", "prompt", "answer"]).head(eval_items).fillna("")
        if frame.empty:
            continue
        verifiable = frame[(frame["prompt"] != "") & (frame["answer"] != "")]
        sets[domain] = ValidationSet(
            domain=domain,
            texts=frame["text"].tolist(),
            prompts=verifiable["prompt"].tolist(),
            answers=verifiable["answer"].tolist(),
        )
    return sets


def evaluate_domains(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: dict[str, ValidationSet],
    batch_size: int = 64,
) -> dict[str, dict[str, float | None]]:
    """Per domain: mean token loss on `text` + EOS, and greedy exact match of `answer` given `prompt`.

    Leaves the model in the mode it found it and the RNG untouched, so evaluating during training
    does not change the training run.
    """
    import torch

    from posttrain.generation import generate

    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float | None]] = {}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for domain, vset in sets.items():
                loss = _mean_token_loss(model, tokenizer, vset.texts, batch_size)
                exact: float | None = None
                if vset.prompts:
                    answer_ids = tokenizer(vset.answers, add_special_tokens=False)["input_ids"]
                    max_new = max(len(ids) for ids in answer_ids) + 1  # +1: room for EOS
                    outputs = generate(model, tokenizer, vset.prompts, max_new_tokens=max_new, batch_size=batch_size)
                    hits = [out[0].strip() == ans.strip() for out, ans in zip(outputs, vset.answers, strict=False)]
                    exact = sum(hits) / len(hits)
                results[domain] = {"loss": loss, "exact_match": exact}
    finally:
        model.train(was_training)
    return results


def _mean_token_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int
) -> float:
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # left padding would shift Llama's positions
    try:
        for start in range(0, len(texts), batch_size):
            chunk = [t + tokenizer.eos_token for t in texts[start : start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += losses.item()
            count += int((labels != -100).sum())
    finally:
        tokenizer.padding_side = side
    return total / max(1, count)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_key(stage: str, section: TrainStageConfig, *, seed: int, inputs: dict[str, Any]) -> str:
    """Hash of everything that determines a run: the stage's params, the seed and its inputs' content hashes.

    A checkpoint is only resumed by a run with the same key; changing a param or an input starts fresh.
    """
    return params_hash({"stage": stage, "section": section.model_dump(mode="json"), "seed": seed, "inputs": inputs})


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def find_resume_checkpoint(folder: Path, *, remove_incomplete: bool = False) -> Path | None:
    """The newest checkpoint under `folder` holding the COMPLETE marker (None if there is none).

    Checkpoints without the marker were cut off mid-save (HF checkpoints are not atomic); they are
    skipped, and with `remove_incomplete` deleted so the Trainer does not write into them later.
    """
    newest: Path | None = None
    for _step, path in _checkpoints(folder):
        if (path / COMPLETE_MARKER).is_file():
            newest = path
        else:
            log.warning("checkpoint %s has no %s marker (half-written); skipped", path, COMPLETE_MARKER)
            if remove_incomplete:
                shutil.rmtree(path, ignore_errors=True)
    return newest


# --------------------------------------------------------------------------- callbacks


def _all_finite(model: PreTrainedModel) -> bool:
    import torch

    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in model.parameters()]).all())


def make_callbacks(
    stage: str,
    evaluation: ContinualEvaluation | None,
    preemption: Preemption | None = None,
) -> list[TrainerCallback]:
    """The standard callbacks, in the order they must run (the marker last on save)."""
    # Preemption first: the save it asks for on a step must be seen by the guard's check of that step.
    callbacks: list[Any] = [preemption] if preemption is not None else []
    callbacks += [NonFiniteGuard(stage), ProgressLog(stage)]
    if evaluation is not None:
        callbacks.append(evaluation)
    callbacks.append(CheckpointMarker())
    return callbacks


class NonFiniteGuard(TrainerCallback):
    """Stop the stage when the loss or the weights become NaN/inf, before anything is saved.

    The weights are checked at every step that logs, saves or ends training (a NaN loss turns them NaN
    at its step, and they stay NaN), the loss at every log; raising here ends trainer.train(), so no
    checkpoint and no model follow.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # Only on steps that log, save or end training (the Trainer's flow callback, which runs first,
        # has set those flags): a diverged run still stops before any checkpoint or model is written,
        # without a device-to-host sync on every step.
        due = control.should_log or control.should_save or control.should_training_stop
        if model is not None and (due or state.global_step >= state.max_steps) and not _all_finite(model):
            raise StageError(
                f"stage {self.stage}: weights became NaN/inf at step {state.global_step} (training diverged); "
                f"no model written. Lower {self.stage}.trainer.learning_rate or max_grad_norm"
            )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise StageError(
                    f"stage {self.stage}: {key} is {value} at step {state.global_step} (training diverged); "
                    f"no model written. Lower {self.stage}.trainer.learning_rate or max_grad_norm"
                )


class CheckpointMarker(TrainerCallback):
    """Write COMPLETE into a checkpoint once the Trainer has fully saved it (on_save runs after the save)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Distributed: every rank writes part of a checkpoint (its RNG state, optimizer shards);
        # it is complete only once all have finished, and only rank 0 marks it.
        _barrier()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not folder.is_dir():
            return
        marker = folder / COMPLETE_MARKER
        marker.write_text(json.dumps({"step": state.global_step, "time": time.time()}) + "\n")
        _fsync(marker)


class ProgressLog(TrainerCallback):
    """One line per logging step: step, loss, learning rate, steps/s."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.started = time.perf_counter()
        self.first_step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()
        self.first_step = state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" not in logs:
            return
        elapsed = max(1e-9, time.perf_counter() - self.started)
        rate = (state.global_step - (self.first_step or 0)) / elapsed
        log.info(
            "%s step %d/%d loss %.4f lr %.2e (%.1f steps/s)",
            self.stage, state.global_step, state.max_steps, logs["loss"], logs.get("learning_rate", float("nan")), rate,
        )  # fmt: skip


class ContinualEvaluation(TrainerCallback):
    """Every `every` steps, score each domain's validation set; keep the series (the stability gap).

    The series is written into each checkpoint before its marker, so a resumed run keeps the points
    recorded before it was interrupted.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sets: dict[str, ValidationSet], every: int) -> None:
        self.tokenizer = tokenizer
        self.sets = sets
        self.every = every
        self.series: list[dict[str, Any]] = []
        # Seconds spent scoring inside trainer.train(): subtracted so tokens/s measures training alone.
        self.seconds_in_training = 0.0

    def record(self, step: int, model: PreTrainedModel) -> dict[str, dict[str, float | None]]:
        scores = evaluate_domains(model, self.tokenizer, self.sets)
        self.series = [row for row in self.series if row["step"] != step]
        for domain, values in scores.items():
            self.series.append({"step": step, "domain": domain, **values})
        shown = ", ".join(
            f"{d} loss {v['loss']:.3f}" + (f" em {v['exact_match']:.2f}" if v["exact_match"] is not None else "")
            for d, v in scores.items()
        )
        log.info("eval step %d: %s", step, shown)
        return scores

    def at(self, step: int) -> dict[str, dict[str, float | None]] | None:
        rows = [row for row in self.series if row["step"] == step]
        if not rows:
            return None
        return {row["domain"]: {"loss": row["loss"], "exact_match": row["exact_match"]} for row in rows}

    def load(self, checkpoint: Path) -> None:
        path = checkpoint / SERIES_FILE
        if path.is_file():
            self.series = json.loads(path.read_text())

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.every and self.sets and model is not None and state.global_step % self.every == 0:
            started = time.perf_counter()
            self.record(state.global_step, model)
            self.seconds_in_training += time.perf_counter() - started

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():  # every rank holds the same series
            write_json_atomic(folder / SERIES_FILE, self.series)


class Preemption(TrainerCallback):
    """SIGTERM (preemption, `kill`, Prefect cancel): save a checkpoint at the end of the step, then stop."""

    def __init__(self) -> None:
        self.requested = False

    def request(self, signum: int, frame: Any) -> None:
        log.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    @contextmanager
    def installed(self) -> Iterator[None]:
        try:
            previous = signal.signal(signal.SIGTERM, self.request)
        except ValueError:  # not the main thread: no signal handling
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the whole run


@dataclass
class TrainingJob:
    """One training stage run, as the stage module describes it.

    The trainer is `trainer_cls(model=, args=, train_dataset=, processing_class=, callbacks=,
    **trainer_kwargs)`, which fits SFTTrainer, DPOTrainer and GRPOTrainer alike.
    """

    stage: str
    section: TrainStageConfig
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    train_dataset: datasets.Dataset
    # Mixture manifest: its hash goes into lineage.json and the checkpoint key.
    data_manifest: Path | None
    # Input model folders (lineage parents; their content hashes go into the checkpoint key).
    parents: list[Path] = field(default_factory=list)
    config_cls: type | None = None  # default trl.SFTConfig
    trainer_cls: type | None = None  # default trl.SFTTrainer
    config_fields: dict[str, Any] = field(default_factory=dict)  # stage-specific TRL config fields
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. reward_funcs, ref_model
    key_inputs: dict[str, Any] = field(default_factory=dict)  # anything else that determines the result
    lineage_extra: dict[str, Any] = field(default_factory=dict)
    metrics_extra: dict[str, Any] = field(default_factory=dict)
    # The model's LoRA adapter, from posttrain.adapters.load_input_model (None: full fine-tuning).
    adapter: AdapterSetup | None = None


def run_training(job: TrainingJob, params: Params, layout: Layout, runtime: Runtime) -> StageResult:
    """Train, resuming from the newest complete checkpoint; write model, lineage, metrics and plots."""
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from posttrain.modeling import count_parameters

    stage, section = job.stage, job.section
    if section.lora is not None and job.adapter is None:
        raise ParamsError(
            f"{stage}.lora: set, but stage {stage} does not load its model through posttrain.adapters "
            "(LoRA needs a pretrained input model); expected null here"
        )
    positions = getattr(job.model.config, "max_position_embeddings", None)
    if positions is not None and section.max_length > positions:
        raise ParamsError(
            f"{stage}.max_length: got {section.max_length}, expected at most the model's max_position_embeddings "
            f"({positions})"
        )
    parents = [parent_entry(p, layout.root) for p in job.parents]
    key = checkpoint_key(
        stage,
        section,
        seed=runtime.seed,
        inputs={
            "parents": [p["content_hash"] for p in parents],
            "data_manifest": json_hash(job.data_manifest) if job.data_manifest else None,
            "precision": runtime.precision,
            # A continued adapter is only as good as its base: the base's hash decides the run too.
            **({"adapter_base": job.adapter.base["content_hash"]} if job.adapter else {}),
            # More processes = a larger global batch: another run, never resumed from a 1-process checkpoint.
            **({"world_size": world_size()} if world_size() > 1 else {}),
            **job.key_inputs,
        },
    )
    ckpt_dir = layout.checkpoints(stage, key)
    ckpt_shown = ckpt_dir.relative_to(layout.root).as_posix() if ckpt_dir.is_relative_to(layout.root) else str(ckpt_dir)
    # Only rank 0 deletes half-written checkpoints (the others skip them the same way).
    resume = find_resume_checkpoint(ckpt_dir, remove_incomplete=is_main_process())

    config = trl_config(job.config_cls or SFTConfig, stage, section, runtime, ckpt_dir, **job.config_fields)
    domains = list(params.data.domains)
    evaluation = ContinualEvaluation(
        job.tokenizer, load_validation_sets(layout, domains, section.eval_items), section.eval_every
    )
    preemption = Preemption()
    trainer = with_schedule(job.trainer_cls or SFTTrainer)(
        model=job.model,
        args=config,
        train_dataset=job.train_dataset,
        processing_class=job.tokenizer,
        callbacks=make_callbacks(stage, evaluation, preemption),
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
    if not _all_finite(model):
        raise StageError(f"stage {stage}: final weights contain NaN/inf; no model written")
    after = evaluation.at(state.global_step) or evaluation.record(state.global_step, model)

    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    steps_run = state.global_step - (int(resume.name.split("-")[-1]) if resume else 0)
    tokens_run = state.num_input_tokens_seen - _tokens_at(resume)
    metrics: dict[str, Any] = {
        "stage": stage,
        "steps": state.global_step,
        "steps_this_run": steps_run,
        "resumed_from_step": int(resume.name.split("-")[-1]) if resume else None,
        "seconds": round(seconds, 2),  # trainer.train(), continual evaluation included
        "eval_seconds": round(evaluation.seconds_in_training, 2),  # of which continual evaluation
        # Rates over training alone (`seconds` - `eval_seconds`), comparable with a bare TRL run.
        "steps_per_second": round(steps_run / training_seconds, 3),
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_second": round(tokens_run / training_seconds, 1),
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": losses[-1] if losses else None,
        "train_loss_mean": output.training_loss,
        "val_before": before,
        "val_after": after,
        "continual_eval": evaluation.series,
        "parameters": count_parameters(model),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_examples": len(job.train_dataset),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": runtime.device,
        "precision": runtime.precision,
        "threads": runtime.num_threads,
        "checkpoints": ckpt_shown,
        "world_size": config.world_size,
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
        return StageResult(metrics=_flat_metrics(metrics), model_dir=None)
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
    )


def write_model_output(
    stage: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    params: Params,
    layout: Layout,
    section: Any,
    parents: list[dict[str, Any]],
    data_manifest: Path | None,
    metrics: dict[str, Any],
    lineage_extra: dict[str, Any] | None = None,
    adapter: AdapterSetup | None = None,
    state_dict: dict[str, Any] | None = None,
) -> StageResult:
    """Model folder (atomically, lineage last), then metrics JSON, then plots of the eval series.

    With an `adapter`, the folder is the merged model or the adapter itself (its `lora.handoff`).
    """
    from posttrain.modeling import save_model

    final = layout.model(stage)
    with atomic_output_dir(final) as tmp:
        if adapter is not None:
            from posttrain.adapters import save_output

            lineage_extra = {**(lineage_extra or {}), "adapter": save_output(
                model, tokenizer, tmp, adapter, final=final, state_dict=state_dict
            )}  # fmt: skip
        else:
            save_model(model, tokenizer, tmp, state_dict=state_dict)
        record = write_lineage(
            tmp,
            stage=stage,
            root=layout.root,
            parents=parents,
            params=section.model_dump(mode="json"),
            params_hash=params_hash(section),
            seed=params.seed,
            data_manifest=data_manifest,
            extra=lineage_extra,
        )
    metrics = {**metrics, "content_hash": record["content_hash"]}
    write_json_atomic(layout.metrics(stage), metrics)
    artifacts = [layout.metrics(stage), *write_eval_plot(stage, metrics.get("continual_eval") or [], layout)]
    log.info("%s: model written to %s", stage, final)
    return StageResult(metrics=_flat_metrics(metrics), model_dir=final, artifacts=artifacts)


def write_eval_plot(stage: str, series: list[dict[str, Any]], layout: Layout) -> list[Path]:
    """PNG of validation loss and exact match per domain over steps, plus the rows as JSON for `dvc plots`."""
    if not series:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data_path = layout.plots / f"{stage}_continual_eval.json"
    write_json_atomic(data_path, series)
    domains = sorted({row["domain"] for row in series})
    fig, (ax_loss, ax_em) = plt.subplots(1, 2, figsize=(10, 4))
    for domain in domains:
        rows = sorted((r for r in series if r["domain"] == domain), key=lambda r: r["step"])
        ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", label=domain)
        em = [(r["step"], r["exact_match"]) for r in rows if r["exact_match"] is not None]
        if em:
            ax_em.plot(*zip(*em, strict=False), marker="o", label=domain)
    ax_loss.set(title=f"{stage}: validation loss", xlabel="step", ylabel="loss per token")
    ax_em.set(title=f"{stage}: greedy exact match", xlabel="step", ylabel="exact match", ylim=(-0.02, 1.02))
    ax_loss.legend()
    ax_em.legend()
    fig.tight_layout()
    png_path = layout.plots / f"{stage}_continual_eval.png"
    tmp = png_path.with_name(f".{png_path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return [png_path, data_path]


def _tokens_at(checkpoint: Path | None) -> int:
    if checkpoint is None or not (checkpoint / "trainer_state.json").is_file():
        return 0
    return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars for MLflow: nested per-domain values flattened to `val_after.add.loss` style keys."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            for sub, inner in _flat_metrics(value).items():
                flat[f"{key}.{sub}"] = inner
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = value
    return flat
