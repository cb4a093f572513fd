"""Model FLOPs, achieved TFLOP/s and MFU of a training run: the one definition every trainer stage uses.

Model FLOPs per trained token (PaLM, Chowdhery et al. 2022, appendix B; the form torchtitan logs):

    forward  = 2 N + 4 L H Q T
    training = 6 N + 12 L H Q T                (every weight trains: forward + 2 x forward backward)
             = 4 N + 2 N_trainable + 12 L H Q T (in general: the weight gradients cost 2 N_trainable;
                                                 a LoRA adapter skips those of the frozen weights)

    N  parameters that take part in a matmul per token: all parameters minus the input embedding
       table (a lookup), plus that table again when it is tied to the output head (then a matmul);
    L  decoder layers, H attention heads, Q head dimension (H Q = the attention width);
    T  the sequence length the attention spans: the stage's `max_length`. The attention term counts
       the full T x T score matrix (PaLM's convention, no halving for the causal mask); rows shorter
       than max_length, or packed rows whose documents attend only within themselves, do less.

Per stage, the FLOPs of one counted token (TRL's token count: non-padding tokens of the batch; GRPO:
prompt + completion tokens of each generation batch):

    pretrain, cpt, sft   training
    dpo                  training + forward (the frozen reference's forward over the same tokens;
                         none when TRL precomputed the reference log-probs before training)
    grpo                 num_iterations x training (+ forward when beta > 0: the reference model;
                         + forward when TRL recomputes the old policy's log-probs); generation is
                         not counted: its time is in the stage's training seconds unless a split
                         of those seconds is given (`update_seconds`, see `throughput_metrics`)

Achieved TFLOP/s = FLOPs per token x tokens / seconds of training (all processes' tokens); MFU =
achieved / (world size x the device's dense bf16 peak: `PEAK_TFLOPS`, or `compute.peak_tflops`). On CPU there is no such peak in the table: MFU is
null with the reason, unless compute.peak_tflops is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, matched against
# torch.cuda.get_device_name() in this order (the first entry whose words are all in the name).
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("H100", "PCIe"), 756.0, "NVIDIA H100 PCIe, dense bf16"),
    (("H100", "NVL"), 835.0, "NVIDIA H100 NVL, dense bf16"),
    (("H100",), 989.0, "NVIDIA H100 SXM, dense bf16"),
    (("H200", "NVL"), 835.0, "NVIDIA H200 NVL, dense bf16"),
    (("H200",), 989.0, "NVIDIA H200 SXM, dense bf16"),
    (("A100",), 312.0, "NVIDIA A100, dense bf16"),
    (("L40S",), 362.0, "NVIDIA L40S, dense bf16"),
)


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs formula reads from a causal LM (`ModelShape.of(model)`)."""

    layers: int
    hidden: int
    heads: int
    head_dim: int
    parameters: int  # every parameter (adapter included)
    trainable: int  # parameters with requires_grad
    embedding: int  # the input embedding table
    tied: bool  # the output head shares the input embedding

    @property
    def matmul_parameters(self) -> int:
        """N: parameters used in a matmul per token (the input lookup excluded, a tied head included)."""
        return self.parameters - self.embedding + (self.embedding if self.tied else 0)

    @classmethod
    def of(cls, model: Any) -> ModelShape:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        params = list(model.parameters())
        embedding = model.get_input_embeddings().weight
        output = model.get_output_embeddings()
        return cls(
            layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            heads=heads,
            head_dim=int(head_dim),
            parameters=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in params if p.requires_grad),
            embedding=embedding.numel(),
            tied=output is not None and output.weight is embedding,
        )


def forward_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """2 N + 4 L H Q T."""
    return 2.0 * shape.matmul_parameters + 4.0 * shape.layers * shape.heads * shape.head_dim * seq_len


def training_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """4 N + 2 N_trainable + 12 L H Q T (= 6 N + 12 L H Q T when every weight trains)."""
    trainable = min(shape.trainable, shape.matmul_parameters)
    attention = 12.0 * shape.layers * shape.heads * shape.head_dim * seq_len
    return 4.0 * shape.matmul_parameters + 2.0 * trainable + attention


def stage_flops_per_token(shape: ModelShape, seq_len: int, train_passes: int = 1, extra_forwards: int = 0) -> float:
    """FLOPs of one counted token: `train_passes` trainings of it plus `extra_forwards` forwards (module doc)."""
    return train_passes * training_flops_per_token(shape, seq_len) + extra_forwards * forward_flops_per_token(
        shape, seq_len
    )


@dataclass(frozen=True)
class Peak:
    """The denominator of MFU: TFLOP/s and where the figure comes from (None: no peak, `source` says why)."""

    tflops: float | None
    source: str


def device_peak(device: str, device_name: str | None, override: float | None) -> Peak:
    """`compute.peak_tflops` when set; else the table's dense bf16 peak of a known GPU; else none, with why."""
    if override is not None:
        return Peak(override, "compute.peak_tflops")
    if device != "cuda":
        return Peak(None, f"no dense bf16 peak for device {device!r} in the table; set compute.peak_tflops for an MFU")
    for words, tflops, label in PEAK_TFLOPS:
        if device_name and all(word in device_name for word in words):
            return Peak(tflops, f"table: {label}")
    return Peak(None, f"GPU {device_name!r} is not in the peak table; set compute.peak_tflops for an MFU")


def mfu(flops_per_token: float, tokens: float, seconds: float, peak: Peak) -> tuple[float, float | None]:
    """(achieved TFLOP/s, MFU as a fraction of the peak, None without a peak)."""
    achieved = flops_per_token * tokens / seconds / 1e12 if seconds > 0 else 0.0
    return achieved, (achieved / peak.tflops if peak.tflops else None)


def throughput_metrics(
    shape: ModelShape,
    seq_len: int,
    tokens: float,
    seconds: float,
    peak: Peak,
    *,
    train_passes: int = 1,
    extra_forwards: int = 0,
    update_seconds: float | None = None,
    devices: int = 1,
) -> dict[str, Any]:
    """The MFU fields of a stage's metrics.json.

    `tokens` are every process's (TRL gathers its token count over the ranks), so the peak is that of
    `devices` GPUs: MFU is per device, whatever the world size.

    `seconds`: training seconds (continual evaluation excluded); for GRPO they include generation and
    rewards. `update_seconds`, when a split of those seconds is known (GRPO's optimizer updates
    alone), adds `update_achieved_tflops` and `update_mfu` over the same tokens and FLOPs.
    """
    per_token = stage_flops_per_token(shape, seq_len, train_passes, extra_forwards)
    peak = Peak(peak.tflops * devices if peak.tflops else None, peak.source)
    achieved, fraction = mfu(per_token, tokens, seconds, peak)
    metrics: dict[str, Any] = {
        "flops_per_token": per_token,
        "achieved_tflops": achieved,
        "mfu": fraction,
        "peak_tflops": peak.tflops / devices if peak.tflops else None,  # of one device
        "mfu_basis": {
            "devices": devices,
            "formula": "train_passes x (4N + 2N_trainable + 12 L H Q T) + extra_forwards x (2N + 4 L H Q T)",
            "N": shape.matmul_parameters,
            "N_trainable": shape.trainable,
            "L": shape.layers,
            "H": shape.heads,
            "Q": shape.head_dim,
            "T": seq_len,
            "train_passes": train_passes,
            "extra_forwards": extra_forwards,
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "peak": peak.source,
        },
    }
    if update_seconds is not None:
        update_achieved, update_fraction = mfu(per_token, tokens, update_seconds, peak)
        metrics["update_seconds"] = round(update_seconds, 3)
        metrics["update_achieved_tflops"] = update_achieved
        metrics["update_mfu"] = update_fraction
    return metrics


def trainer_passes(trainer: Any) -> tuple[int, int]:
    """(train_passes, extra_forwards) of a TRL trainer, read from its config and models (module doc)."""
    args = trainer.args
    kind = type(args).__name__
    if kind == "DPOConfig":
        reference = getattr(trainer, "ref_model", None) is not None or hasattr(trainer.model, "disable_adapter")
        precomputed = bool(getattr(args, "precompute_ref_log_probs", False))
        return 1, int(reference and not precomputed)
    if kind == "GRPOConfig":
        iterations = int(getattr(args, "num_iterations", 1) or 1)
        generate_every = (
            int(getattr(args, "steps_per_generation", None) or args.gradient_accumulation_steps) * iterations
        )
        old_logps = int(
            args.gradient_accumulation_steps % generate_every != 0 or bool(getattr(args, "use_vllm", False))
        )
        return iterations, int(float(getattr(args, "beta", 0.0) or 0.0) > 0) + old_logps
    return 1, 0


# --------------------------------------------------------------------------- memory (a decision aid)

# Bytes per activation value kept for the backward pass, per token and layer, in units of the hidden
# size: Korthikanti et al. 2022 (sbh(34 + 5as/h) for a bf16 transformer layer; the 5as/h score term
# vanishes with SDPA / flash attention, which keep no T x T matrix).
ACTIVATION_BYTES_PER_HIDDEN = 34


def training_memory_gb(shape: ModelShape, micro_batch_tokens: int, reference_copies: int = 0) -> float:
    """A rough estimate of one process's GPU memory for a training step without activation checkpointing.

    fp32 weights (4 bytes/parameter; bf16 runs autocast from fp32 master weights) + fp32 gradients and
    AdamW's two moments for trainable ones (12 bytes) + `reference_copies` frozen fp32 copies (DPO's
    reference) + activations (ACTIVATION_BYTES_PER_HIDDEN x hidden x layers bytes per token of the
    micro-batch). It only decides the gradient-checkpointing default (`posttrain.training.trl_config`);
    it is never reported as a measurement.
    """
    state = 4 * shape.parameters * (1 + reference_copies) + 12 * shape.trainable
    activations = ACTIVATION_BYTES_PER_HIDDEN * shape.hidden * shape.layers * micro_batch_tokens
    return (state + activations) / 2**30
