"""MFU from known FLOPs on a toy model: every figure below is computed by hand in the comments."""

from __future__ import annotations

import pytest

from posttrain.training.flops import (
    ModelShape,
    device_peak,
    forward_flops_per_token,
    throughput_metrics,
    training_flops_per_token,
    training_memory_gb,
)


@pytest.fixture(scope="module")
def toy_shape() -> ModelShape:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32)  # fmt: skip
    return ModelShape.of(LlamaForCausalLM(config))


def test_shape_of_a_toy_llama(toy_shape: ModelShape) -> None:
    # embedding 10 x 8 = 80; per layer q, k, v, o 4 x 64 = 256, gate/up/down 3 x 128 = 384, two norms 16
    # -> 656; 2 layers 1312; final norm 8: 80 + 1312 + 8 = 1400, the head tied to the embedding.
    assert (toy_shape.parameters, toy_shape.embedding, toy_shape.tied, toy_shape.trainable) == (1400, 80, True, 1400)
    assert (toy_shape.layers, toy_shape.hidden, toy_shape.heads, toy_shape.head_dim) == (2, 8, 2, 4)
    # N: minus the lookup (80), plus the tied head's matmul (80) = 1400.
    assert toy_shape.matmul_parameters == 1400


def test_flops_per_token_by_hand(toy_shape: ModelShape) -> None:
    # T = 16: 6N = 8400; 12 L H Q T = 12 x 2 x 2 x 4 x 16 = 3072.
    assert training_flops_per_token(toy_shape, 16) == 8400 + 3072
    # forward 2N + 4 L H Q T = 2800 + 1024.
    assert forward_flops_per_token(toy_shape, 16) == 2800 + 1024
    # LoRA-like: 100 trainable parameters -> 4N + 2 x 100 + 3072.
    frozen = ModelShape(**{**toy_shape.__dict__, "trainable": 100})
    assert training_flops_per_token(frozen, 16) == 5600 + 200 + 3072


def test_mfu_from_known_flops(toy_shape: ModelShape) -> None:
    peak = device_peak("cpu", None, override=1e-2)  # 0.01 TFLOP/s = 1e10 FLOP/s
    m = throughput_metrics(toy_shape, 16, tokens=1000, seconds=2.0, peak=peak)
    # 11472 FLOP/token x 1000 tokens / 2 s = 5.736e6 FLOP/s = 5.736e-6 TFLOP/s; / 1e10 = 5.736e-4.
    assert m["flops_per_token"] == 11472
    assert m["achieved_tflops"] == pytest.approx(5.736e-6)
    assert m["mfu"] == pytest.approx(5.736e-4)
    assert m["mfu_basis"]["peak"] == "compute.peak_tflops"
    # DPO: + the reference forward (3824) per token -> 15296 x 500 / 1 s = 7.648e6 FLOP/s.
    dpo = throughput_metrics(toy_shape, 16, tokens=500, seconds=1.0, peak=peak, extra_forwards=1)
    assert dpo["flops_per_token"] == 11472 + 3824
    assert dpo["mfu"] == pytest.approx(7.648e-4)
    # Two processes (TRL's token count is gathered over them): the peak of two devices, half the MFU.
    two = throughput_metrics(toy_shape, 16, tokens=1000, seconds=2.0, peak=peak, devices=2)
    assert two["mfu"] == pytest.approx(5.736e-4 / 2) and two["peak_tflops"] == 1e-2
    # GRPO with an update-time split: the same FLOPs over the update seconds alone.
    grpo = throughput_metrics(toy_shape, 16, tokens=1000, seconds=4.0, peak=peak, update_seconds=1.0)
    assert grpo["mfu"] == pytest.approx(11472 * 1000 / 4.0 / 1e10)
    assert grpo["update_mfu"] == pytest.approx(11472 * 1000 / 1.0 / 1e10)


def test_peak_table_and_cpu_without_a_peak() -> None:
    assert device_peak("cuda", "NVIDIA H100 80GB HBM3", None).tflops == 989.0
    assert device_peak("cuda", "NVIDIA H100 PCIe", None).tflops == 756.0
    assert device_peak("cuda", "NVIDIA H200", None).tflops == 989.0
    assert device_peak("cuda", "NVIDIA A100-SXM4-80GB", None).tflops == 312.0
    assert device_peak("cuda", "NVIDIA L40S", None).tflops == 362.0
    assert device_peak("cuda", "NVIDIA H100 80GB HBM3", 900.0).tflops == 900.0
    unknown = device_peak("cuda", "NVIDIA GeForce RTX 3090", None)
    assert unknown.tflops is None and "not in the peak table" in unknown.source
    cpu = device_peak("cpu", None, None)
    assert cpu.tflops is None and "set compute.peak_tflops" in cpu.source


def test_cpu_mfu_is_null_with_the_reason(toy_shape: ModelShape) -> None:
    m = throughput_metrics(toy_shape, 16, tokens=1000, seconds=2.0, peak=device_peak("cpu", None, None))
    assert m["mfu"] is None and m["peak_tflops"] is None and "no dense bf16 peak" in m["mfu_basis"]["peak"]
    assert m["achieved_tflops"] == pytest.approx(5.736e-6)  # still computed: FLOPs are known


def test_memory_estimate_by_hand(toy_shape: ModelShape) -> None:
    # 4 x 1400 (weights) + 12 x 1400 (grads, Adam) = 22400 bytes; activations 34 x 8 x 2 x 100 = 54400.
    assert training_memory_gb(toy_shape, 100) * 2**30 == pytest.approx(22400 + 54400)
    # DPO's reference copy adds 4 x 1400.
    assert training_memory_gb(toy_shape, 100, reference_copies=1) * 2**30 == pytest.approx(28000 + 54400)
