"""Where and how a stage computes: device, precision, torch threads, seeds, and the process's rank.

`setup_runtime` is the first call of every stage that builds a model (trainers and evaluate alike):
it picks device and precision from `compute:`, sets the thread count and seeds every RNG.
The rank helpers read the launcher's environment only (no torch): only global rank 0 writes outputs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.config import ComputeConfig
from posttrain.errors import ParamsError, StageError

log = logging.getLogger(__name__)


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
    # lazy: torch/transformers/datasets take seconds to import; this module also serves the cheap
    # rank queries that posttrain.pipeline.entry asks before deciding whether to relaunch.
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


def process_rank(env: Mapping[str, str] | None = None) -> int:
    """Global rank of this process (0 when not distributed)."""
    env = os.environ if env is None else env
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if env.get(name):
            return int(env[name])
    return 0


def world_size(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE") or 1)


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    """Only global rank 0 writes outputs: other ranks would race on the same atomic renames."""
    return process_rank(env) == 0
