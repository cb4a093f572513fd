"""The GPU defaults are a pure function of (device, capabilities, params): resolved here on CPU for both
a CPU machine and described CUDA machines (posttrain.runtime.resolve_runtime, trl_config.memory_levers)."""

from __future__ import annotations

import pytest

from posttrain.config import ComputeConfig, TrainStageConfig
from posttrain.errors import ParamsError, StageError
from posttrain.runtime import Capabilities, check_attention, resolve_runtime
from posttrain.training.trl_config import memory_levers

CPU = Capabilities(cuda=False)
H100 = Capabilities(cuda=True, bf16=True, device_name="NVIDIA H100 80GB HBM3", memory_gb=79.2)
H100_LIGER = Capabilities(cuda=True, bf16=True, device_name="NVIDIA H100 80GB HBM3", memory_gb=79.2,
                          packages=frozenset({"liger_kernel", "flash_attn"}))  # fmt: skip


def resolve(caps: Capabilities, attn: str | None = None, **compute: object):
    return resolve_runtime(ComputeConfig(**compute), caps, seed=7, threads=2, attn_implementation=attn)


def test_cpu_keeps_the_fields_it_always_had() -> None:
    runtime = resolve(CPU)
    assert runtime.trainer_fields() == {
        "use_cpu": True, "bf16": False, "fp16": False, "seed": 7, "data_seed": 7, "activation_checkpointing": False,
    }  # fmt: skip
    assert (runtime.precision, runtime.tf32, runtime.attn_implementation, runtime.kernels) == (
        "fp32",
        False,
        None,
        "none",
    )
    # An installed kernel package changes nothing on CPU either.
    assert resolve(Capabilities(cuda=False, packages=frozenset({"liger_kernel"}))).kernels == "none"


def test_cuda_defaults_bf16_tf32_sdpa_and_liger_where_installed() -> None:
    plain = resolve(H100)
    assert (plain.device, plain.precision, plain.tf32, plain.attn_implementation, plain.kernels) == (
        "cuda", "bf16", True, "sdpa", "none",
    )  # fmt: skip
    assert plain.trainer_fields() == {"use_cpu": False, "bf16": True, "fp16": False, "seed": 7, "data_seed": 7,
                                      "tf32": True}  # fmt: skip
    assert resolve(H100_LIGER).kernels == "liger"
    # A GPU without native bf16 (e.g. a T4) stays in fp32 under precision auto.
    assert resolve(Capabilities(cuda=True, bf16=False, memory_gb=15.0)).precision == "fp32"


def test_each_cuda_default_is_overridden_by_params() -> None:
    runtime = resolve(H100_LIGER, "flash_attention_2", precision="fp32", tf32=False, kernels="none", compile=True)
    assert (runtime.precision, runtime.tf32, runtime.attn_implementation, runtime.kernels) == (
        "fp32", False, "flash_attention_2", "none",
    )  # fmt: skip
    assert runtime.trainer_fields()["torch_compile"] is True and "tf32" not in runtime.trainer_fields()
    # device: cpu on a GPU machine resolves exactly as a CPU machine does.
    assert resolve(H100_LIGER, device="cpu") == resolve(CPU)


def test_attention_that_is_not_installed_is_refused_by_name() -> None:
    with pytest.raises(
        ParamsError, match=r"model\.attn_implementation: 'flash_attention_2' needs the package 'flash_attn'"
    ):
        resolve(H100, "flash_attention_2")
    with pytest.raises(ParamsError, match=r"'flash_attention_3' needs the package 'flash_attn_interface'"):
        check_attention("flash_attention_3", H100)
    with pytest.raises(
        ParamsError, match=r"'kernels-community/flash-attn2' is a Hub kernel, which needs the package 'kernels'"
    ):
        resolve(H100, "kernels-community/flash-attn2")
    with pytest.raises(ParamsError, match=r"'flash_attention_2' needs a CUDA device"):
        check_attention("flash_attention_2", Capabilities(cuda=False, packages=frozenset({"flash_attn"})))
    with pytest.raises(ParamsError, match=r"'flash_attn_2' is not an attention implementation; expected one of"):
        resolve(H100, "flash_attn_2")
    for name in ("eager", "sdpa", "flex_attention"):
        assert resolve(CPU, name).attn_implementation == name


def test_kernels_and_tf32_that_cannot_run_are_refused() -> None:
    with pytest.raises(ParamsError, match=r"compute\.kernels: 'liger' .* the package 'liger-kernel' is not installed"):
        resolve(H100, kernels="liger")
    with pytest.raises(ParamsError, match=r"compute\.kernels: 'hub' needs the package 'kernels'"):
        resolve(H100, kernels="hub")
    with pytest.raises(ParamsError, match=r"compute\.tf32: got true on CPU"):
        resolve(CPU, tf32=True)
    with pytest.raises(StageError, match="no CUDA device is visible"):
        resolve(CPU, device="cuda")


def test_packing_default_is_bfd_on_cuda_for_sft_trainer_stages_only() -> None:
    cpu, cuda = resolve(CPU), resolve(H100)
    section = TrainStageConfig()
    assert (
        memory_levers("sft", section, cpu, packable=True) == {}
    )  # CPU: as before (trainer_fields turns checkpointing off)
    assert memory_levers("sft", section, cuda, packable=True, estimated_gb=10.0) == {
        "packing": True, "packing_strategy": "bfd", "activation_checkpointing": False,
    }  # fmt: skip
    assert memory_levers("dpo", section, cuda, packable=False, estimated_gb=10.0) == {"activation_checkpointing": False}
    off = TrainStageConfig(packing=False, gradient_checkpointing=True)
    assert memory_levers("sft", off, cuda, packable=True) == {"activation_checkpointing": True}
    with pytest.raises(ParamsError, match=r"dpo\.packing: got true, but TRL's DPOConfig has no packing"):
        memory_levers("dpo", TrainStageConfig(packing=True), cuda, packable=False, config_name="DPOConfig")


def test_gradient_checkpointing_turns_on_only_where_the_step_would_not_fit() -> None:
    cuda = resolve(H100)  # 79.2 GB: the limit is 0.9 x 79.2 = 71.3 GB
    section = TrainStageConfig()
    assert memory_levers("cpt", section, cuda, packable=True, estimated_gb=70.0)["activation_checkpointing"] is False
    assert memory_levers("cpt", section, cuda, packable=True, estimated_gb=72.0)["activation_checkpointing"] is True
    # Asked for explicitly, it holds whatever the estimate says.
    asked = TrainStageConfig(gradient_checkpointing=False)
    assert memory_levers("cpt", asked, cuda, packable=True, estimated_gb=500.0)["activation_checkpointing"] is False
