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


# Attention implementations transformers ships, and the package each optional one needs.
BUILTIN_ATTENTION = ("eager", "sdpa", "flex_attention")
ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
# Optional packages a stage can use where installed (probed by `probe_capabilities`).
OPTIONAL_PACKAGES = ("flash_attn", "flash_attn_interface", "kernels", "liger_kernel")


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers a stage: probed by `probe_capabilities`, read by the pure `resolve_runtime`."""

    cuda: bool
    bf16: bool = False  # the GPU computes bf16 natively
    device_name: str | None = None
    memory_gb: float | None = None  # total memory of the GPU
    packages: frozenset[str] = frozenset()  # the OPTIONAL_PACKAGES that are importable


@dataclass(frozen=True)
class Runtime:
    """Where and how a stage computes; `trainer_fields()` are the matching TrainingArguments."""

    device: Literal["cpu", "cuda"]
    precision: Literal["fp32", "bf16", "fp16"]
    num_threads: int
    seed: int
    # The GPU defaults (docs/gpu.md); their CPU values leave the CPU runs as they were.
    tf32: bool = False
    attn_implementation: str | None = None  # None: transformers' own default
    kernels: Literal["liger", "hub", "none"] = "none"
    compile: bool = False
    device_name: str | None = None
    memory_gb: float | None = None
    peak_tflops: float | None = None  # compute.peak_tflops (None: posttrain.training.flops' table)

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
        if self.tf32:
            fields["tf32"] = True
        if self.compile:
            fields["torch_compile"] = True
        return fields


def check_attention(name: str, caps: Capabilities) -> None:
    """Refuse, by name, an attention implementation this machine cannot run (ParamsError)."""
    key = f"model.attn_implementation: {name!r}"
    if name in BUILTIN_ATTENTION:
        return
    if name in ATTENTION_PACKAGES:
        package = ATTENTION_PACKAGES[name]
        if package not in caps.packages:
            raise ParamsError(
                f"{key} needs the package {package!r}, which is not installed; expected sdpa (PyTorch's own "
                f"flash and memory-efficient kernels), or install {package} on the GPU machine"
            )
        if not caps.cuda:
            raise ParamsError(f"{key} needs a CUDA device; expected sdpa or eager on CPU")
        return
    if "/" in name:  # a Hub kernel, e.g. kernels-community/flash-attn2
        if "kernels" not in caps.packages:
            raise ParamsError(
                f"{key} is a Hub kernel, which needs the package 'kernels' (not installed) and the Hub or its "
                "cache; expected sdpa, or install kernels"
            )
        return
    known = [*BUILTIN_ATTENTION, *ATTENTION_PACKAGES]
    raise ParamsError(f"{key} is not an attention implementation; expected one of {known} or a Hub kernel 'org/name'")


def resolve_runtime(
    compute: ComputeConfig, caps: Capabilities, seed: int, threads: int, attn_implementation: str | None = None
) -> Runtime:
    """Device, precision and the GPU defaults from params and the machine: a pure function (tested on CPU).

    With CUDA: bf16 (where supported) + TF32, sdpa attention, Liger's kernels where installed; each
    can be overridden in params. On CPU the defaults add nothing, so CPU runs stay as they were.
    """
    if compute.device == "cuda" and not caps.cuda:
        raise StageError("compute.device is 'cuda' but no CUDA device is visible; expected a GPU or device: auto/cpu")
    device: Literal["cpu", "cuda"] = (
        "cuda" if compute.device == "cuda" or (compute.device == "auto" and caps.cuda) else "cpu"
    )
    cuda = device == "cuda"
    precision: Literal["fp32", "bf16", "fp16"]
    if compute.precision == "auto":
        precision = "bf16" if cuda and caps.bf16 else "fp32"
    else:
        precision = compute.precision
    if not cuda and precision == "fp16":
        raise ParamsError("compute.precision: got 'fp16' on CPU; expected auto, fp32 or bf16 there")
    if not cuda and compute.tf32:
        raise ParamsError(
            "compute.tf32: got true on CPU; TF32 is a CUDA (Ampere or newer) matmul mode, expected null or false"
        )
    attention = attn_implementation or ("sdpa" if cuda else None)
    if attention is not None:
        check_attention(attention, caps)
    kernels: Literal["liger", "hub", "none"]
    if compute.kernels == "auto":
        kernels = "liger" if cuda and "liger_kernel" in caps.packages else "none"
    else:
        kernels = compute.kernels
    if kernels == "liger" and not ("liger_kernel" in caps.packages and cuda):
        why = "the package 'liger-kernel' is not installed" if "liger_kernel" not in caps.packages else "no CUDA device"
        raise ParamsError(
            f"compute.kernels: 'liger' needs liger-kernel's Triton kernels on CUDA, but {why}; expected auto or none"
        )
    if kernels == "hub" and "kernels" not in caps.packages:
        raise ParamsError(
            "compute.kernels: 'hub' needs the package 'kernels' (not installed) and the Hub or its cache; expected auto or none"
        )
    return Runtime(
        device=device,
        precision=precision,
        num_threads=threads,
        seed=seed,
        tf32=cuda if compute.tf32 is None else compute.tf32,
        attn_implementation=attention,
        kernels=kernels,
        compile=compute.compile,
        device_name=caps.device_name if cuda else None,
        memory_gb=caps.memory_gb if cuda else None,
        peak_tflops=compute.peak_tflops,
    )


def probe_capabilities() -> Capabilities:
    """The visible GPU (name, memory, bf16) and which optional packages are importable."""
    import importlib.util  # lazy: only stages that build a model probe the machine

    import torch

    packages = frozenset(name for name in OPTIONAL_PACKAGES if importlib.util.find_spec(name) is not None)
    if not torch.cuda.is_available():
        return Capabilities(cuda=False, packages=packages)
    props = torch.cuda.get_device_properties(0)
    return Capabilities(
        cuda=True,
        bf16=torch.cuda.is_bf16_supported(),
        device_name=torch.cuda.get_device_name(0),
        memory_gb=round(props.total_memory / 2**30, 1),
        packages=packages,
    )


def setup_runtime(compute: ComputeConfig, seed: int, attn_implementation: str | None = None) -> Runtime:
    """Pick device, precision and the GPU defaults, set torch threads, seed every RNG. Call before building a model.

    `attn_implementation`: params' model.attn_implementation (None: sdpa with CUDA, transformers' default on CPU).
    """
    import datasets
    import torch
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = compute.num_threads or min(cores, 8)
    runtime = resolve_runtime(compute, probe_capabilities(), seed, threads, attn_implementation)
    if runtime.device == "cpu" and runtime.precision == "bf16":
        log.warning("compute.precision bf16 on CPU is emulated and several times slower than fp32")
    torch.set_num_threads(threads)
    set_seed(seed)
    hf_logging.disable_progress_bar()  # weight-loading and dataset-map bars flood DVC/Prefect logs
    datasets.disable_progress_bars()
    log.info(
        "runtime: device=%s precision=%s threads=%d seed=%d tf32=%s attention=%s kernels=%s compile=%s",
        runtime.device, runtime.precision, threads, seed, runtime.tf32, runtime.attn_implementation or "default",
        runtime.kernels, runtime.compile,
    )  # fmt: skip
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
