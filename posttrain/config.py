"""Typed schema for params.yaml.

Every knob of every stage lives in params.yaml; this module is the only place that reads it.
Loading validates the whole file before any work starts, and every error names the key path,
the bad value and what was expected. Importing this module must stay cheap (no torch, no trl):
`posttrain validate` has to answer in about a second.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.data.verifiers import VERIFIERS
from posttrain.errors import ParamsError
from posttrain.scoring.rewards import REWARDS
from posttrain.spec import (  # the stage names and the chain's defaults live with the stage spec
    DEFAULT_PARENTS,
    MODEL_STAGES,
    STAGE_NAMES,
    TRAINING_STAGES,
    VARIANT_NAME,
    VARIANT_STAGES,
    foreach_group,
    split_name,
    variant_name,
    variants_stage,
)

# Merge methods that take task vectors against `merge.base` (posttrain.models.merging).
MERGE_NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "adamerging")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
OpenFraction = Annotated[float, Field(ge=0.0, lt=1.0)]
# torch, numpy and random all accept this range; numpy refuses negatives and values >= 2**32.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
# Domain names become folder names under artifacts/ and MLflow metric names: no path separators,
# no "..", nothing MLflow refuses (it rejects e.g. parentheses).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SAFE_NAME_HINT = "letters, digits, '_' and '-', starting with a letter or digit, at most 64 characters"
# YAML 1.1 (PyYAML) reads `1e-8` (no dot) as a string; these are the e-notation forms it misses.
_E_NOTATION = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def check_safe_name(name: str, key: str) -> None:
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"{key}: got {name!r}; expected {SAFE_NAME_HINT}")


class Strict(BaseModel):
    """Unknown keys are errors; configs are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- compute and model


class EngineConfig(Strict):
    """Which engine generates text (posttrain.scoring.engines; docs/generation.md): GRPO rollouts,
    on-policy DPO samples, continual evaluation and the `evaluate` stage. Set once as
    `compute.generation`, or per stage as `<stage>.generation` (which then wins as a whole)."""

    # auto: on CUDA the fastest engine installed (vllm, then paged, then hf); on CPU hf.
    engine: Literal["auto", "hf", "paged", "vllm"] = "auto"
    # vllm only. colocate: vLLM inside the stage's process, on its GPU; server: requests go to a
    # running `trl vllm-serve` (vllm_server_url, TRL's default is port 8000 on this host).
    vllm_mode: Literal["colocate", "server"] = "colocate"
    # colocate: vLLM frees its weights and KV cache between generations (the training step needs the memory).
    vllm_sleep_mode: bool = True
    vllm_gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.3
    vllm_server_url: str | None = None


class ComputeConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 on a GPU that supports it, fp32 on CPU (bf16 is emulated, ~7.5x slower there).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # 0 = let the stage pick (all cores, at most 8, for small CPU machines).
    num_threads: NonNegInt = 0
    # GPU defaults (posttrain.runtime.resolve_runtime; docs/gpu.md). null = decided from the device:
    # TF32 matmuls: on with CUDA (Ampere or newer), off on CPU, where it does not exist.
    tf32: bool | None = None
    # Fused layer kernels. auto: Liger's (RMSNorm, RoPE, SwiGLU) with CUDA where liger-kernel is
    # installed, else none; liger: required (refused where not installed); hub: transformers'
    # `use_kernels` (TRL 1.16's replacement for `use_liger_kernel`; needs `kernels` and the Hub or its cache).
    kernels: Literal["auto", "liger", "hub", "none"] = "auto"
    # torch.compile the model inside the Trainer (its first steps then include the compilation).
    compile: bool = False
    # Dense bf16 peak of the device in TFLOP/s for MFU (posttrain.training.flops); null = the table
    # for known GPUs, none on CPU.
    peak_tflops: Annotated[float, Field(gt=0.0)] | None = None
    # "accelerate" wraps each trainer stage in `accelerate launch --config_file <accelerate_config>`.
    launcher: Literal["python", "accelerate"] = "python"
    accelerate_config: str | None = None
    # The generation engine of every stage that does not set its own `<stage>.generation`.
    generation: EngineConfig = EngineConfig()

    @model_validator(mode="after")
    def _launcher_needs_config(self) -> ComputeConfig:
        if self.launcher == "accelerate" and not self.accelerate_config:
            raise ValueError("compute.launcher is 'accelerate' but compute.accelerate_config is not set")
        return self


class TokenizerConfig(Strict):
    """Used only when model.base is 'scratch': a BPE tokenizer trained on the pipeline's own data,
    or (`path`) a real tokenizer read from a local folder, e.g. SmolLM2's, for a model of realistic shape."""

    # A local folder with tokenizer files (tokenizer.json, tokenizer_config.json); relative to the
    # project root. Set: vocab_size and min_frequency are not used (the folder's vocabulary is).
    path: str | None = None
    vocab_size: Annotated[int, Field(ge=32, le=1_000_000)] = 96
    min_frequency: PositiveInt = 2
    # Domains whose train splits the tokenizer (and pretrain's evaluation) reads; null = every domain.
    # Listed explicitly, a domain added later (e.g. for CPT) leaves pretrain untouched; its
    # characters must then already be covered by these domains (others map to <unk>).
    domains: list[str] | None = None
    # Put a BOS token (`<s>`) in front of every text on encode, as the tokenizers of Llama 2/3, Mistral
    # and Gemma do (posttrain.models.encoding); off: no special tokens are added on encode.
    bos: bool = False


class ArchitectureConfig(Strict):
    """LlamaConfig fields for a model built from scratch (~1M parameters by default)."""

    hidden_size: PositiveInt = 128
    intermediate_size: PositiveInt = 512
    num_hidden_layers: PositiveInt = 4
    num_attention_heads: PositiveInt = 4
    num_key_value_heads: PositiveInt = 4
    max_position_embeddings: PositiveInt = 64
    rope_theta: Annotated[float, Field(gt=0)] = 10000.0
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> ArchitectureConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        return self


class ModelConfig(Strict):
    # "scratch" builds a tiny Llama from `architecture` and trains a tokenizer; anything else is a
    # hub id or a local folder loaded with from_pretrained.
    base: str = "scratch"
    revision: str | None = None
    # Off unless the user sets it: remote code runs arbitrary Python from the model repository.
    trust_remote_code: bool = False
    tokenizer: TokenizerConfig = TokenizerConfig()
    architecture: ArchitectureConfig = ArchitectureConfig()
    # Chat template for conversational data (posttrain.chat_template): 'base' (the model's own),
    # 'chatml' (built-in, with generation markers for assistant-only loss) or a Jinja file path.
    # None: no template; prompts are plain text.
    chat_template: str | None = None
    # Attention kernel passed to every model load (transformers' `attn_implementation`): eager, sdpa,
    # flex_attention, flash_attention_2/3, or a Hub kernel `org/name`. null: sdpa with CUDA,
    # transformers' own default on CPU. One that is not installed is refused by name (posttrain.runtime).
    attn_implementation: str | None = None

    @field_validator("chat_template")
    @classmethod
    def _template_named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty; expected 'base', 'chatml' or a path to a Jinja file")
        return value

    @model_validator(mode="after")
    def _tokenizer_folder_for_scratch(self) -> ModelConfig:
        if self.tokenizer.path is not None and self.base != "scratch":
            raise ValueError(
                f"tokenizer.path: {self.tokenizer.path!r} is used only with base 'scratch' (a pretrained base "
                f"{self.base!r} brings its own tokenizer); expected null"
            )
        return self


# --------------------------------------------------------------------------- data


# Record fields a source's `columns:` may map (TRL's standard formats, posttrain.data.formats).
RECORD_FIELDS_FROM_FILES = ("prompt", "answer", "text", "completion", "messages", "chosen", "rejected")


class _DomainBase(Strict):
    # Verifier used for GRPO rewards and evaluation; default: the generator's own checker.
    verifier: str | None = None

    @field_validator("verifier")
    @classmethod
    def _known_verifier(cls, verifier: str | None) -> str | None:
        if verifier is not None and verifier not in VERIFIERS:
            raise ValueError(f"unknown verifier {verifier!r}; expected one of {sorted(VERIFIERS)}")
        return verifier


def _check_columns(columns: dict[str, str]) -> dict[str, str]:
    """A source maps record fields onto its columns: the fields of one of TRL's standard formats."""
    unknown = sorted(set(columns) - set(RECORD_FIELDS_FROM_FILES))
    if unknown:
        raise ValueError(f"unknown record field(s) {unknown}; expected keys among {list(RECORD_FIELDS_FROM_FILES)}")
    if "text" in columns and (set(columns) - {"text"}):
        raise ValueError(
            f"maps text and {sorted(set(columns) - {'text'})}; expected either text (language modelling) "
            "or the fields of another format"
        )
    empty = sorted(field for field, column in columns.items() if not column.strip())
    if empty:
        raise ValueError(f"empty column name for field(s) {empty}; expected a column of the file")
    return columns


class _SyntheticDomain(_DomainBase):
    # Render each item as a conversation (user: prompt, assistant: answer) for chat models.
    chat: bool = False


class _ArithmeticDomain(_SyntheticDomain):
    digits: Annotated[int, Field(ge=1, le=12)] = 2
    # Difficulty buckets: operands of digits..max_digits digits, equal shares per digit count
    # (the GRPO curriculum's arms). null: `digits` only.
    max_digits: Annotated[int, Field(ge=1, le=12)] | None = None
    n_items: PositiveInt = 4000

    @model_validator(mode="after")
    def _digits_ordered(self) -> _ArithmeticDomain:
        if self.max_digits is not None and self.max_digits < self.digits:
            raise ValueError(f"max_digits ({self.max_digits}) is less than digits ({self.digits})")
        return self


class AdditionDomain(_ArithmeticDomain):
    kind: Literal["addition"]


class SubtractionDomain(_ArithmeticDomain):
    kind: Literal["subtraction"]


class ReverseDomain(_SyntheticDomain):
    kind: Literal["reverse"]
    min_length: Annotated[int, Field(ge=1, le=32)] = 3
    max_length: Annotated[int, Field(ge=1, le=32)] = 6
    n_items: PositiveInt = 4000

    @model_validator(mode="after")
    def _lengths_ordered(self) -> ReverseDomain:
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) is greater than max_length ({self.max_length})")
        return self


class ChainDomain(_SyntheticDomain):
    """Multi-step addition (`23+45+17=`); with `chat: true` the reply is a worked solution ending in
    `\\boxed{answer}`, checked by the `math` verifier (math-verify) by default."""

    kind: Literal["chain"]
    digits: Annotated[int, Field(ge=1, le=6)] = 2
    terms: Annotated[int, Field(ge=2, le=8)] = 3
    # Difficulty buckets: chains of terms..max_terms operands, equal shares per length. null: `terms` only.
    max_terms: Annotated[int, Field(ge=2, le=8)] | None = None
    n_items: PositiveInt = 4000

    @model_validator(mode="after")
    def _terms_ordered(self) -> ChainDomain:
        if self.max_terms is not None and self.max_terms < self.terms:
            raise ValueError(f"max_terms ({self.max_terms}) is less than terms ({self.terms})")
        return self


class LoreDomain(_SyntheticDomain):
    """A fictional world of people (posttrain.data.lore), the same for every domain naming the same `world`
    and `entities`: `form: text` gives encyclopedia passages about them (new-domain text for CPT), `form: qa`
    one question per fact (held-out questions test what CPT taught)."""

    kind: Literal["lore"]
    form: Literal["text", "qa"]
    # The world's name seeds it (with data.seed): change it for another set of people and facts.
    world: str = "lore"
    entities: Annotated[int, Field(ge=1, le=512)] = 48


class FileDomain(_DomainBase):
    """A local JSONL, CSV or Parquet file. Columns are mapped onto the record schema."""

    kind: Literal["file"]
    path: str
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    # Record field -> column in the file, e.g. {prompt: question, answer: solution}.
    columns: dict[str, str] = {}
    # Drop rows that fail validation instead of failing the stage (counted and reported).
    skip_bad_rows: bool = False

    _columns = field_validator("columns")(_check_columns)


class HubDomain(_DomainBase):
    """A `datasets` id (needs network or a local cache) loaded with datasets.load_dataset."""

    kind: Literal["hub"]
    name: str
    subset: str | None = None
    # A commit sha or tag of the dataset repository: required for hub ids (posttrain.data.userdeps), so
    # that the data behind params.yaml cannot change without DVC seeing a params change.
    revision: str | None = None
    split: str = "train"
    columns: dict[str, str] = {}
    max_items: PositiveInt | None = None
    # Drop rows that fail validation instead of failing the stage (counted and reported).
    skip_bad_rows: bool = False

    _columns = field_validator("columns")(_check_columns)


DomainConfig = Annotated[
    AdditionDomain | SubtractionDomain | ReverseDomain | ChainDomain | LoreDomain | FileDomain | HubDomain,
    Field(discriminator="kind"),
]


class SplitConfig(Strict):
    """Deterministic split by a hash of each item's content (stable when data is appended)."""

    val_fraction: OpenFraction = 0.05
    test_fraction: OpenFraction = 0.10
    salt: str = "split-v1"

    @model_validator(mode="after")
    def _room_for_train(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} leaves no "
                "training data; expected a sum below 1"
            )
        return self


class DecontaminationConfig(Strict):
    ngram: Annotated[int, Field(ge=1, le=64)] = 8
    # Share of a test item's n-grams found in training data above which the item counts as leaked.
    max_overlap: Fraction = 0.8
    # Share of leaked test items that fails the stage.
    max_leaked_fraction: Fraction = 0.0


class DataConfig(Strict):
    seed: int = 0
    domains: dict[str, DomainConfig]
    split: SplitConfig = SplitConfig()
    decontamination: DecontaminationConfig = DecontaminationConfig()

    @field_validator("domains")
    @classmethod
    def _some_domains(cls, domains: dict[str, Any]) -> dict[str, Any]:
        if not domains:
            raise ValueError("no domains declared; expected at least one")
        for name in domains:
            check_safe_name(str(name), f"domain name data.domains.{name}")
        return domains


class ReplayConfig(Strict):
    """Mix in data another stage was trained on (continual pretraining with replay)."""

    from_stage: str
    fraction: OpenFraction = 0.25


class AdaptiveMixingConfig(Strict):
    """Online mixture weights during training (posttrain.training.adaptive_mixing; Aioli-style)."""

    method: Literal["aioli"] = "aioli"
    # Weight updates during the stage, evenly spaced over its steps (the first before step 1).
    rounds: PositiveInt = 4
    # Optimizer steps on one domain per probe (a probe per domain per round, on a copy of the model).
    probe_steps: PositiveInt = 2
    # Exponentiated-gradient step size on the proportions.
    step_size: Annotated[float, Field(gt=0.0)] = 1.0
    # Validation items per domain whose loss the probes measure (never test items).
    eval_items: PositiveInt = 32
    # Floor on every proportion, so that no domain is dropped for good.
    min_proportion: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.02


class MixtureConfig(Strict):
    weights: dict[str, Annotated[float, Field(ge=0.0)]]
    # Number of training items in the mixture (replay included).
    total: PositiveInt = 4000
    # Temperature sampling: weights are raised to 1/temperature and renormalised.
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    # Which record shape the stage trains on.
    format: Literal["text", "prompt_completion", "preference", "prompt_answer", "conversational"] = "text"
    replay: ReplayConfig | None = None
    # Sampling seed (combined with the stage name). Lives here, not in data, so that the `mix`
    # stage depends only on the `mixtures` params that dvc.yaml declares for it.
    seed: int = 0
    # null: the static weights above. Else the training stage re-estimates proportions online
    # (formats text and prompt_completion only).
    adaptive: AdaptiveMixingConfig | None = None
    # Items joined into one row (posttrain.data.mixing.group_rows): texts concatenated, chat items as one
    # multi-turn conversation, prompt formats with the earlier items as few-shot context before the last
    # item's prompt. `total` counts rows, so total x group items are drawn. A GPU recipe uses it to make
    # rows as long as its max_length from the built-in domains' short items.
    group: PositiveInt = 1

    @model_validator(mode="after")
    def _adaptive_needs_sft_format(self) -> MixtureConfig:
        if self.adaptive is not None and self.format not in ("text", "prompt_completion"):
            raise ValueError(
                f"adaptive: set for format {self.format!r}; online mixing runs in the SFTTrainer stages, "
                "expected format text or prompt_completion"
            )
        if self.adaptive is not None and self.group > 1:
            raise ValueError(
                f"adaptive: set with group {self.group}; online mixing re-draws single items per domain, "
                "expected group: 1"
            )
        return self

    @field_validator("weights")
    @classmethod
    def _weights_not_all_zero(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("no domain weights; expected at least one domain with weight > 0")
        if sum(weights.values()) <= 0:
            raise ValueError(f"all weights are zero ({weights}); expected at least one weight > 0")
        return weights


# --------------------------------------------------------------------------- training stages


class TrainerArgs(BaseModel):
    """Passed straight into TRL's config class (SFTConfig, DPOConfig, GRPOConfig).

    The common knobs are typed and range-checked here; any other key is handed to TRL as is and
    TRL's own checks run on it when the stage builds its config.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _e_notation_numbers(cls, values: Any) -> Any:
        """`adam_epsilon: 1e-8` arrives as the string '1e-8' (YAML 1.1); TRL would fail on it late."""
        if not isinstance(values, dict):
            return values
        return {
            k: float(v) if isinstance(v, str) and _E_NOTATION.fullmatch(v.strip()) else v for k, v in values.items()
        }

    learning_rate: Annotated[float, Field(gt=0.0)] = 1e-3
    max_steps: PositiveInt = 100
    per_device_train_batch_size: PositiveInt = 16
    gradient_accumulation_steps: PositiveInt = 1
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0
    logging_steps: PositiveInt = 10
    save_steps: PositiveInt = 100


class ScheduleConfig(Strict):
    """Learning-rate schedule (see posttrain.training.schedules for the shapes)."""

    name: Literal["cosine", "wsd", "constant_cooldown", "infinite", "constant", "linear"] = "cosine"
    warmup_fraction: Fraction = 0.05
    # wsd / constant_cooldown / infinite: share of steps spent in the final decay.
    decay_fraction: Fraction = 0.2
    # infinite: share of steps spent cooling down from peak to the constant level.
    cooldown_fraction: Fraction = 0.2
    # infinite: the constant level, as a fraction of the peak learning rate.
    constant_ratio: Fraction = 0.5
    # Floor of every decay, as a fraction of the peak learning rate.
    min_lr_ratio: Fraction = 0.0

    @model_validator(mode="after")
    def _phases_fit(self) -> ScheduleConfig:
        used = self.warmup_fraction + self.decay_fraction
        if self.name == "infinite":
            used += self.cooldown_fraction
        if self.name in ("wsd", "constant_cooldown", "infinite") and used > 1.0:
            raise ValueError(f"schedule phases add up to {used:.3f} of the steps; expected at most 1")
        return self


class LoRAConfig(Strict):
    """LoRA / QLoRA through PEFT (posttrain.models.lora; docs/scale-out.md)."""

    r: PositiveInt = 16
    alpha: Annotated[float, Field(gt=0.0)] = 32.0
    dropout: Fraction = 0.05
    # "all-linear" (PEFT's shortcut: every linear layer but the output head) or module names.
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    # What this stage writes: `merge` = adapter merged into a full model folder (merge_and_unload);
    # `pass_on` = the adapter folder + a pointer to its base in lineage.json; the next stage then
    # continues training this adapter on that same base (it must set `lora:` too).
    handoff: Literal["merge", "pass_on"] = "merge"
    # QLoRA: the frozen base loaded in 4 or 8 bit with bitsandbytes (CUDA only).
    quantization: Literal["4bit", "8bit"] | None = None


# TRL's GRPOConfig fields that the generation engine sets (posttrain.training.trl_config.engine_fields):
# refused in `<stage>.trainer`, so that one setting decides which engine runs.
ENGINE_TRAINER_KEYS = (
    "use_vllm",
    "use_transformers_continuous_batching",
    "use_transformers_paged",
    "vllm_mode",
    "vllm_enable_sleep_mode",
    "vllm_gpu_memory_utilization",
    "vllm_server_base_url",
)


class NoLearningConfig(Strict):
    """What a training stage does when it measures that it did not learn (posttrain.training.no_learning).

    Defaults measured on healthy runs (docs/real-model.md, "A stage that learned nothing"): the toy
    recipe's stages move their training loss by 12% (DPO) to 93% (SFT) from first to last log; a stage
    that cannot learn moves it by 0% (1 step at lr 1e-9) and writes the weights it read.
    """

    # warn: log it and record it in metrics.json; fail: stop the stage (no model written).
    action: Literal["warn", "fail"] = "warn"
    # The trained weights are bit-identical to the input model's (the same digest).
    unchanged_weights: bool = True
    # |first - last| / |first| of the training loss (means of the first and last logged losses, up to 3
    # each) below which the loss "did not move"; null: not checked.
    min_loss_change: Fraction | None = 0.01


class GRPONoLearningConfig(NoLearningConfig):
    """GRPO's loss is no learning signal (~0 by construction with beta 0): off by default. Before training,
    the share of held-out prompts whose `num_generations` sampled completions all get the same reward:
    such groups have zero advantage and give no gradient."""

    min_loss_change: Fraction | None = None
    # Above this share GRPO cannot learn (91% was measured before a run that changed no weight); null: off.
    max_zero_variance_groups: Fraction | None = 0.9


class TrainStageConfig(Strict):
    # The model stage this one trains on; null: the default chain (pretrain > cpt > sft > dpo > grpo,
    # each on the one before). `sft.parent: pretrain` skips cpt, `grpo.parent: sft` skips dpo: a stage
    # runs only when something the recipe evaluates or merges needs it (Params.chain).
    parent: str | None = None
    trainer: TrainerArgs = TrainerArgs()
    schedule: ScheduleConfig = ScheduleConfig()
    max_length: PositiveInt = 64
    # Memory levers. None: off, unless with CUDA the step would not fit without it (an estimate,
    # posttrain.training.gpu_defaults); on CPU always off (it only slows a small model there).
    gradient_checkpointing: bool | None = None
    # Pack several examples into each max_length row, padding-free (TRL's BFD; SFTTrainer stages
    # only: pretrain, cpt, sft). None: on with CUDA for those stages, off on CPU.
    packing: bool | None = None
    # null: full fine-tuning; else train a LoRA adapter (see LoRAConfig.handoff for what is written).
    lora: LoRAConfig | None = None
    # A training example longer than max_length: cut it, or stop the stage.
    on_too_long: Literal["truncate", "refuse"] = "refuse"
    # Continual evaluation: every N optimizer steps (0 = off) score each domain's validation set.
    eval_every: NonNegInt = 0
    eval_items: PositiveInt = 64
    # The domains continual evaluation scores (before and after training too); null: every domain.
    eval_domains: list[str] | None = None
    # Checkpoint averaging in place of LR decay: train at a constant LR (schedule.name constant) and
    # write the average of the run's last K complete checkpoints as the stage's model; 0 = off.
    average_last: NonNegInt = 0
    # null: compute.generation. The engine of this stage's generation (continual evaluation; DPO's
    # on-policy samples; GRPO's rollouts and held-out rewards).
    generation: EngineConfig | None = None
    # Checks that the stage learned something, and whether a failed check warns or stops the stage.
    no_learning: NoLearningConfig = NoLearningConfig()

    @model_validator(mode="after")
    def _engine_not_in_trainer(self) -> TrainStageConfig:
        set_there = sorted(set(self.trainer.model_extra or {}) & set(ENGINE_TRAINER_KEYS))
        if set_there:
            raise ValueError(
                f"trainer.{set_there[0]}: the generation engine is chosen by <stage>.generation or "
                "compute.generation (engine: auto | hf | paged | vllm, vllm_mode, vllm_sleep_mode, ...; "
                "docs/generation.md); expected it unset in trainer"
            )
        return self

    @model_validator(mode="after")
    def _averaging_needs_constant_lr(self) -> TrainStageConfig:
        if self.average_last and self.schedule.name != "constant":
            raise ValueError(
                f"average_last: {self.average_last} replaces LR decay; expected schedule.name 'constant', "
                f"got {self.schedule.name!r}"
            )
        if self.average_last and self.lora is not None:
            raise ValueError("average_last: averages full-model checkpoints; expected lora: null")
        steps, every = self.trainer.max_steps, self.trainer.save_steps
        if self.average_last and steps // every < self.average_last:
            raise ValueError(
                f"average_last: {self.average_last} checkpoints, but trainer.max_steps {steps} / save_steps {every} "
                f"saves only {steps // every}"
            )
        return self


class DPOStageConfig(TrainStageConfig):
    # offline: chosen = verified answer, rejected = a plausible wrong answer.
    # on_policy: sample the input model, pair a correct sample with an incorrect one.
    pairs: Literal["offline", "on_policy"] = "offline"
    on_policy_samples: Annotated[int, Field(ge=2)] = 8
    beta: Annotated[float, Field(gt=0.0)] = 0.1


class RewardSpec(Strict):
    name: str
    weight: float = 1.0


class CurriculumConfig(Strict):
    """A bandit curriculum over arms of the GRPO mixture (posttrain.training.curriculum; DUMP-style UCB)."""

    method: Literal["ucb"] = "ucb"
    # domain: one arm per mixture domain; difficulty: one per (domain, difficulty bucket).
    arms: Literal["domain", "difficulty"] = "difficulty"
    # Weight c of the bonus c * sqrt(ln(N + 1) / (n_arm + 1)).
    exploration: Annotated[float, Field(ge=0.0)] = 0.5
    # Recent prompt groups per arm whose mean |advantage| is the arm's score.
    window: PositiveInt = 32
    # Softmax temperature over the scores (smaller: greedier).
    temperature: Annotated[float, Field(gt=0.0)] = 0.1


class HybridConfig(Strict):
    """Per prompt, GRPO when the rollouts' accuracy is above `threshold`, else SFT on the gold answer."""

    threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # Weight of the SFT term against the GRPO loss.
    sft_weight: Annotated[float, Field(gt=0.0)] = 1.0


class GRPOStageConfig(TrainStageConfig):
    no_learning: GRPONoLearningConfig = GRPONoLearningConfig()
    # null: TRL's shuffled order; else a curriculum picks each batch's prompts.
    curriculum: CurriculumConfig | None = None
    # null: GRPO only; else SFT on prompts whose rollouts fail (posttrain.training.hybrid).
    hybrid: HybridConfig | None = None
    rewards: list[RewardSpec] = [RewardSpec(name="exact_match")]
    num_generations: Annotated[int, Field(ge=2)] = 8
    max_completion_length: PositiveInt = 8
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    beta: Annotated[float, Field(ge=0.0)] = 0.0

    @field_validator("rewards")
    @classmethod
    def _some_rewards(cls, rewards: list[RewardSpec]) -> list[RewardSpec]:
        if not rewards:
            raise ValueError("no reward functions; expected at least one")
        unknown = [spec.name for spec in rewards if spec.name not in REWARDS]
        if unknown:
            raise ValueError(f"unknown reward function(s) {unknown}; expected names from {sorted(REWARDS)}")
        return rewards

    @model_validator(mode="after")
    def _groups_fit_batch(self) -> GRPOStageConfig:
        # TRL samples whole prompt groups: the generation batch must be a multiple of num_generations.
        extra = self.trainer.model_extra or {}
        batch = extra.get("generation_batch_size") or (
            self.trainer.per_device_train_batch_size
            * (extra.get("steps_per_generation") or self.trainer.gradient_accumulation_steps)
        )
        if isinstance(batch, int) and batch % self.num_generations:
            raise ValueError(
                f"the generation batch ({batch} = trainer.per_device_train_batch_size x steps per generation) "
                f"must be divisible by num_generations ({self.num_generations})"
            )
        return self


# --------------------------------------------------------------------------- merge and evaluation


class AdaMergingConfig(Strict):
    """merge.method adamerging: task-vector coefficients learned by minimising the merged model's
    prediction entropy on unlabeled validation prompts (posttrain/models/adamerging.py)."""

    granularity: Literal["task", "layer"] = "task"
    steps: PositiveInt = 60
    lr: Annotated[float, Field(gt=0.0)] = 0.05
    # Starting coefficient of every task vector (AdaMerging's paper starts at 0.3).
    init: float = 0.5
    # Unlabeled prompts: the first N of each domain's validation split (never test).
    prompts_per_domain: PositiveInt = 64
    # Domains whose validation prompts are used; empty: every domain.
    domains: list[str] = []
    batch_size: PositiveInt = 64
    # Steps between regenerating the merged model's own answers (the positions the entropy is taken on).
    refresh: PositiveInt = 10
    max_new_tokens: PositiveInt = 8


class WiseFTConfig(Strict):
    """merge.method wise_ft: theta(alpha) = alpha * final + (1 - alpha) * base for merge.models = [final, base]
    (WiSE-FT, Wortsman et al. 2022), alpha chosen on VALIDATION items only (posttrain.models.wise_ft)."""

    # Interpolation weights of the final model tried, 0 (the base) and 1 (the final model) included.
    alphas: list[Fraction] = [0.0, 0.25, 0.5, 0.75, 1.0]
    # Exact match on these domains' validation items: the gain over the base to keep.
    task_domains: list[str] = []
    # Loss on this domain's validation items: the forgetting to recover (e.g. a general-chat probe).
    probe_domain: str | None = None
    # The chosen alpha keeps at least this share of the final model's validation gain and, among those
    # that do, has the lowest probe loss.
    min_gain_kept: Fraction = 0.9
    eval_items: PositiveInt = 32

    @model_validator(mode="after")
    def _ends_included(self) -> WiseFTConfig:
        if 0.0 not in self.alphas or 1.0 not in self.alphas:
            raise ValueError(f"alphas {self.alphas} must include 0.0 (the base) and 1.0 (the final model)")
        if not self.task_domains or self.probe_domain is None:
            raise ValueError("wise_ft needs task_domains (the gain to keep) and probe_domain (the loss to recover)")
        return self


class MergeConfig(Strict):
    method: Literal[
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "slerp",
        "checkpoint_average",
        "adamerging",
        "wise_ft",
    ] = "linear"
    # Stages whose output models are merged (same architecture, one fine-tuning line).
    models: list[str] = ["sft", "grpo"]
    weights: list[Annotated[float, Field(ge=0.0)]] | None = None
    # Task arithmetic, TIES, DARE: the common ancestor the task vectors are taken against.
    base: str | None = None
    # TIES / DARE: share of each task vector kept.
    density: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    # SLERP: interpolation factor between the two models.
    t: Fraction = 0.5
    # checkpoint_average: how many of the last checkpoints of models[0]'s stage to average.
    last_k: PositiveInt = 3
    seed: Seed = 0
    adamerging: AdaMergingConfig = AdaMergingConfig()
    # Only for method wise_ft (null otherwise).
    wise_ft: WiseFTConfig | None = None

    @model_validator(mode="after")
    def _shape(self) -> MergeConfig:
        if not self.models:
            raise ValueError("merge.models is empty; expected at least one stage name")
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(
                f"merge.weights has {len(self.weights)} entries for {len(self.models)} models; expected one per model"
            )
        if self.weights is not None and sum(self.weights) <= 0:
            raise ValueError("merge.weights are all zero; expected at least one weight > 0")
        if self.method == "slerp" and len(self.models) != 2:
            raise ValueError(f"slerp merges exactly two models; got {len(self.models)}")
        if self.method == "wise_ft" and (len(self.models) != 2 or self.wise_ft is None):
            raise ValueError(
                f"wise_ft interpolates merge.models = [final, base] (got {self.models}) and needs merge.wise_ft "
                f"(got {self.wise_ft!r})"
            )
        if self.method in MERGE_NEEDS_BASE and not self.base:
            raise ValueError(f"merge method '{self.method}' needs merge.base (the common ancestor stage)")
        return self


class PassAtKConfig(Strict):
    n: PositiveInt = 8
    k: list[PositiveInt] = [1, 4]
    temperature: Annotated[float, Field(gt=0.0)] = 0.8
    # Items per domain sampled n times (sampling is n times the cost of greedy decoding).
    max_items: PositiveInt = 100

    @model_validator(mode="after")
    def _k_at_most_n(self) -> PassAtKConfig:
        too_big = [k for k in self.k if k > self.n]
        if too_big:
            raise ValueError(f"pass@k with k={too_big} needs k <= n (n={self.n})")
        return self


class LmEvalTaskConfig(Strict):
    # A project-defined lm-evaluation-harness task built from this domain's test split.
    domain: str
    kind: Literal["generate", "perplexity"]
    max_gen_toks: PositiveInt = 16


class LmEvalConfig(Strict):
    """lm-evaluation-harness on each evaluated model folder (posttrain.scoring.lm_eval_tasks)."""

    tasks: list[LmEvalTaskConfig]
    max_items: PositiveInt = 100  # test items per task
    batch_size: PositiveInt = 16


class EvaluateConfig(Strict):
    # Stages whose models are evaluated, in pipeline order (forgetting is computed along it).
    models: list[str] = list(MODEL_STAGES)
    # Domains to evaluate; empty = every domain.
    domains: list[str] = []
    max_items: PositiveInt = 500
    batch_size: PositiveInt = 128
    max_new_tokens: PositiveInt = 8
    pass_at_k: PassAtKConfig = PassAtKConfig()
    bootstrap_samples: PositiveInt = 1000
    confidence: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95
    seed: Seed = 0
    # Off unless set: lm-eval scores (with stderr) go into eval.json under `lm_eval`.
    lm_eval: LmEvalConfig | None = None
    # null: compute.generation. The engine of greedy exact match and pass@k sampling.
    generation: EngineConfig | None = None
    # Domains whose test items are also scored as preference pairs (chosen = the gold answer, or the file's
    # own chosen; rejected = the file's, or a plausible wrong answer): accuracy = chosen more likely.
    preference_domains: list[str] = []


# --------------------------------------------------------------------------- tracking and promotion


class TrackingConfig(Strict):
    enabled: bool = True
    # None: a SQLite store in the project (mlflow.db) unless MLFLOW_TRACKING_URI is set.
    tracking_uri: str | None = None
    experiment: str = "posttrain"
    # The recipe's one registered model: every stage's model is a version of it (tagged with its stage),
    # and `models:/<registered_model_prefix>@champion` is the model a team serves.
    registered_model_prefix: str = "posttrain"

    @field_validator("experiment", "registered_model_prefix")
    @classmethod
    def _mlflow_name(cls, value: str) -> str:
        # Found at validation: MLflow itself refuses these only after a stage trained its model.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}", value):
            raise ValueError(f"got {value!r}; expected a name of letters, digits, '_', '.' and '-' (no '/', not empty)")
        return value


class CandidateRule(Strict):
    """Which evaluated model is the promotion candidate: exactly one of `stage` or `best_of`."""

    # A named model stage, e.g. {stage: merge}.
    stage: str | None = None
    # The best of these stages on `metric` in artifacts/metrics/eval.json, e.g. {best_of: [sft, merge]}.
    best_of: list[str] | None = None
    # A domain's exact match, or `mean` (exact match averaged over the evaluated domains).
    metric: str = "mean"

    @model_validator(mode="after")
    def _one_rule(self) -> CandidateRule:
        if (self.stage is None) == (self.best_of is None):
            raise ValueError(
                "promotion.candidate needs exactly one of `stage: <name>` or `best_of: [<stages>]`; "
                f"got stage={self.stage!r}, best_of={self.best_of!r}"
            )
        if self.best_of is not None and not self.best_of:
            raise ValueError("promotion.candidate.best_of is empty; expected at least one stage name")
        return self


class PromotionConfig(Strict):
    # The candidate when `candidate` is unset: this stage's model.
    final_stage: str = "merge"
    # How the candidate is chosen; None: the final stage's model.
    candidate: CandidateRule | None = None
    # Domains on which the candidate may not be worse than any evaluated model of its own lineage
    # (beyond the confidence intervals and the seed spread); empty: every domain both were scored on.
    lineage_domains: list[str] = []
    # The smallest regression the lineage check must catch, as exact match (0.05 = 5 points): a candidate
    # may be worse than an ancestor by less than this. Where the comparison's uncertainty band is wider,
    # the data cannot tell and the check says "inconclusive" (with the items or seeds that would do).
    max_regression: Fraction = 0.05
    # Per-domain overrides of max_regression, e.g. {add: 0.02}.
    max_regression_per_domain: dict[str, Fraction] = {}
    # An inconclusive verdict (the data cannot detect max_regression) refuses by default.
    on_inconclusive: Literal["refuse", "promote"] = "refuse"
    # The candidate must beat the first evaluated model of its lineage (the base) on at least one domain
    # beyond noise: a chain that learned nothing is never promoted.
    require_learning: bool = True
    min_exact_match: dict[str, Fraction] = {}
    max_forgetting: dict[str, Fraction] = {}
    # Candidate must beat the champion on this domain by at least `min_improvement`, judged with CIs.
    compare_domain: str | None = None
    min_improvement: float = 0.0
    # Scores from different generation engines (eval.json `engine`) are not compared unless this is set.
    allow_engine_mismatch: bool = False
    # Widen every comparison by the seed spread of that difference (artifacts/metrics/seeds.json, `posttrain
    # seeds N`): the rules then judge the recipe, "would another seed's run be this good", not this run's
    # models. Off by default: promotion serves this run's model, and the test items are its uncertainty.
    seed_spread: bool = False

    def regression_margin(self, domain: str) -> float:
        return self.max_regression_per_domain.get(domain, self.max_regression)


def _candidate_problems(promotion: PromotionConfig, domains: set[str], models: list[str]) -> list[tuple[str, Any, str]]:
    """Stage and domain names of promotion.candidate and promotion.lineage_domains that do not exist."""
    problems: list[tuple[str, Any, str]] = []
    for i, domain in enumerate(promotion.lineage_domains):
        if domain not in domains:
            problems.append((f"promotion.lineage_domains[{i}]", domain, f"a domain in {sorted(domains)}"))
    for domain in promotion.max_regression_per_domain:
        if domain not in domains:
            problems.append((f"promotion.max_regression_per_domain.{domain}", domain, f"a domain in {sorted(domains)}"))
    rule = promotion.candidate
    if rule is None:
        return problems
    named = [("promotion.candidate.stage", rule.stage)] if rule.stage is not None else []
    named += [(f"promotion.candidate.best_of[{i}]", stage) for i, stage in enumerate(rule.best_of or [])]
    for key, stage in named:
        if stage not in models:
            problems.append((key, stage, f"one of evaluate.models {models}"))
    if rule.metric != "mean" and rule.metric not in domains:
        problems.append(("promotion.candidate.metric", rule.metric, f"'mean' or a domain in {sorted(domains)}"))
    return problems


# --------------------------------------------------------------------------- orchestration


class ContinualConfig(Strict):
    # New data files dropped here trigger continual pretraining + downstream + evaluation + check.
    incoming_dir: str = "data/incoming"
    # Domain the incoming files are registered under.
    domain: str = "incoming"

    @field_validator("domain")
    @classmethod
    def _safe_domain(cls, domain: str) -> str:
        check_safe_name(domain, "domain name")
        return domain

    # Weight of that domain in the cpt mixture when it is first registered (later edits are kept).
    weight: Annotated[float, Field(gt=0.0)] = 1.0
    # Record field -> column in the incoming files (the file domain's `columns`).
    columns: dict[str, str] = {}
    # Where ingested data is versioned: <store_dir>/<domain>/ (`dvc add`) and <domain>.ingested.json.
    store_dir: str = "data/continual"
    cron: str = "0 2 * * *"


class OrchestrationConfig(Strict):
    max_parallel: PositiveInt = 2
    # Retries per DVC stage name (a retried training stage resumes from its checkpoint).
    retries: dict[str, NonNegInt] = {}
    default_retries: NonNegInt = 1
    retry_delay_seconds: NonNegInt = 5
    continual: ContinualConfig = ContinualConfig()


# --------------------------------------------------------------------------- the whole file


class Params(Strict):
    seed: Seed = 1234
    compute: ComputeConfig = ComputeConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig
    mixtures: dict[str, MixtureConfig]
    pretrain: TrainStageConfig = TrainStageConfig()
    cpt: TrainStageConfig = TrainStageConfig()
    sft: TrainStageConfig = TrainStageConfig()
    dpo: DPOStageConfig = DPOStageConfig()
    grpo: GRPOStageConfig = GRPOStageConfig()
    merge: MergeConfig = MergeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    promotion: PromotionConfig = PromotionConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    # Sibling runs of a training stage from the same parent: {<stage>: {<name>: overrides}}. The
    # overrides are keys of the stage's section (deep-merged onto it) plus `seed`; each variant
    # needs its own mixture `mixtures.<stage>@<name>`. dvc.yaml reads `variants.sft` (keep `sft: {}`).
    variants: dict[str, dict[str, dict[str, Any]]] = {"sft": {}}

    @model_validator(mode="after")
    def _variants_valid(self) -> Params:
        """Each variant's merged section validates; errors name `variants.<stage>.<name>.<key>`."""
        problems: list[str] = []
        for stage, named in self.variants.items():
            if stage not in VARIANT_STAGES:
                problems.append(f"variants.{stage}: got {stage!r}, expected one of {list(VARIANT_STAGES)}")
                continue
            for name, overrides in named.items():
                if not VARIANT_NAME.fullmatch(name):
                    problems.append(f"variants.{stage}.{name}: expected a name of [a-z0-9_]")
                    continue
                if "parent" in overrides:
                    problems.append(
                        f"variants.{stage}.{name}.parent: a variant trains on its stage's parent "
                        f"({stage}.parent); expected no `parent` here"
                    )
                seed = overrides.get("seed", 0)
                if not isinstance(seed, int) or isinstance(seed, bool):
                    problems.append(f"variants.{stage}.{name}.seed: got {seed!r}, expected an integer")
                try:
                    self.stage_section(variant_name(stage, name))
                except ValidationError as error:
                    for item in error.errors():
                        key = f"variants.{stage}.{name}.{_format_location(item['loc'])}".rstrip(".")
                        problems.append(f"{key}: {item['msg'].removeprefix('Value error, ')} (got {item['input']!r})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def variant_names(self) -> set[str]:
        """Every declared variant as its model stage name, `<stage>@<name>`."""
        return {variant_name(stage, name) for stage, named in self.variants.items() for name in named}

    @model_validator(mode="after")
    def _cross_references(self) -> Params:
        """Names used in one section must exist in another; errors carry the full key path."""
        domains = set(self.data.domains)
        problems: list[tuple[str, Any, str]] = []
        problems += _chain_problems(self)
        chain = self.chain() if not problems else []
        for stage in TRAINING_STAGES:
            if stage in chain and stage not in self.mixtures:
                problems.append((f"mixtures.{stage}", None, f"a mixture for training stage '{stage}'"))
        variants = self.variant_names()
        trained = [*TRAINING_STAGES, *sorted(variants)]
        models = [*MODEL_STAGES, *sorted(variants)]
        for variant in sorted(variants):
            if variant not in self.mixtures:
                problems.append((f"mixtures.{variant}", None, f"a mixture for variant '{variant}'"))
        for name, mixture in self.mixtures.items():
            if name not in trained:
                problems.append((f"mixtures.{name}", name, f"one of {trained}"))
            for domain in mixture.weights:
                if domain not in domains:
                    problems.append((f"mixtures.{name}.weights.{domain}", domain, f"a domain in {sorted(domains)}"))
            if mixture.replay and mixture.replay.from_stage not in self.mixtures:
                problems.append(
                    (f"mixtures.{name}.replay.from_stage", mixture.replay.from_stage, f"one of {sorted(self.mixtures)}")
                )
        for stage in TRAINING_STAGES:
            for i, domain in enumerate(getattr(self, stage).eval_domains or []):
                if domain not in domains:
                    problems.append((f"{stage}.eval_domains[{i}]", domain, f"a domain in {sorted(domains)}"))
        for i, domain in enumerate(self.model.tokenizer.domains or []):
            if domain not in domains:
                problems.append((f"model.tokenizer.domains[{i}]", domain, f"a domain in {sorted(domains)}"))
        problems += _stage_order_problems(self)
        for i, stage in enumerate(self.merge.models):
            if stage not in trained:
                problems.append((f"merge.models[{i}]", stage, f"one of {trained}"))
        if self.merge.base is not None and self.merge.base not in trained:
            problems.append(("merge.base", self.merge.base, f"one of {trained}"))
        for i, domain in enumerate(self.merge.adamerging.domains):
            if domain not in domains:
                problems.append((f"merge.adamerging.domains[{i}]", domain, f"a domain in {sorted(domains)}"))
        wise = self.merge.wise_ft
        for key, domain in [(f"task_domains[{i}]", d) for i, d in enumerate(wise.task_domains if wise else [])] + (
            [("probe_domain", wise.probe_domain)] if wise else []
        ):
            if domain not in domains:
                problems.append((f"merge.wise_ft.{key}", domain, f"a domain in {sorted(domains)}"))
        for i, stage in enumerate(self.evaluate.models):
            if stage not in models:
                problems.append((f"evaluate.models[{i}]", stage, f"one of {models}"))
        for i, domain in enumerate(self.evaluate.domains):
            if domain not in domains:
                problems.append((f"evaluate.domains[{i}]", domain, f"a domain in {sorted(domains)}"))
        evaluated = self.evaluate.domains or list(domains)
        for i, domain in enumerate(self.evaluate.preference_domains):
            if domain not in evaluated:
                problems.append(
                    (f"evaluate.preference_domains[{i}]", domain, f"an evaluated domain, one of {sorted(evaluated)}")
                )
        for key in ("min_exact_match", "max_forgetting"):
            for domain in getattr(self.promotion, key):
                if domain not in domains:
                    problems.append((f"promotion.{key}.{domain}", domain, f"a domain in {sorted(domains)}"))
        if self.promotion.final_stage not in MODEL_STAGES:
            problems.append(("promotion.final_stage", self.promotion.final_stage, f"one of {list(MODEL_STAGES)}"))
        elif self.tracking.enabled and self.promotion.final_stage not in self.evaluate.models:
            # Promotion (MLflow only) checks on the final stage's evaluation scores.
            problems.append(
                (
                    "promotion.final_stage",
                    self.promotion.final_stage,
                    f"a stage in evaluate.models {self.evaluate.models}",
                )
            )
        compare = self.promotion.compare_domain
        if compare is not None and compare not in domains:
            problems.append(("promotion.compare_domain", compare, f"a domain in {sorted(domains)}"))
        # The candidate is judged on its evaluation: it must be among the evaluated models.
        problems += _candidate_problems(self.promotion, domains, list(self.evaluate.models))
        dvc_stages = [*STAGE_NAMES, *(variants_stage(stage) for stage in VARIANT_STAGES)]
        for stage in self.orchestration.retries:
            if foreach_group(stage) not in dvc_stages:
                problems.append((f"orchestration.retries.{stage}", stage, f"a stage in {dvc_stages}"))
        if problems:
            raise ValueError("; ".join(f"{path}: got {value!r}, expected {want}" for path, value, want in problems))
        return self

    def stage_section(self, stage: str) -> BaseModel:
        """The section of `stage`; for a variant `<stage>@<name>`, the stage's section with the
        variant's overrides deep-merged onto it (validated by the section's own class)."""
        base, name = split_name(stage)
        section = getattr(self, base)
        if not name:
            return section
        overrides = {k: v for k, v in self.variants[base][name].items() if k != "seed"}
        return type(section).model_validate(_deep_merge(section.model_dump(), overrides))

    def generation_for(self, stage: str) -> tuple[EngineConfig, str]:
        """The engine settings `stage` generates with and their key: `<stage>.generation` where the
        stage sets it, else `compute.generation`."""
        own = getattr(self.stage_section(stage), "generation", None)
        if own is not None:
            return own, f"{stage}.generation"
        return self.compute.generation, "compute.generation"

    def stage_seed(self, stage: str) -> int:
        """The seed a stage runs with: a variant's own `seed`, else the recipe's `seed`."""
        base, name = split_name(stage)
        return int(self.variants[base][name].get("seed", self.seed)) if name else self.seed

    def parent_of(self, stage: str) -> str | None:
        """The model stage `stage` trains on (a variant: its stage's); None for pretrain (it starts the chain)."""
        kind, _ = split_name(stage)
        if kind not in TRAINING_STAGES:
            return None
        declared = getattr(self, kind).parent
        return declared if declared is not None else DEFAULT_PARENTS[kind]

    def merge_inputs(self) -> list[str]:
        """The model stages the merge reads: `merge.models`, and `merge.base` where the method needs it."""
        base = [self.merge.base] if self.merge.base and self.merge.method in MERGE_NEEDS_BASE else []
        return [*self.merge.models, *base]

    def chain(self) -> list[str]:
        """The model stages this recipe runs, in run order: every stage `evaluate.models` lists, each declared
        variant, and whatever those need (their parents, the merge's inputs), transitively."""
        needed: set[str] = set()
        todo = [*self.evaluate.models, *sorted(self.variant_names())]
        while todo:
            stage = todo.pop()
            if stage in needed:
                continue
            needed.add(stage)
            parent = self.parent_of(stage)
            todo += [parent] if parent else []
            todo += self.merge_inputs() if stage == "merge" else []
        variants = sorted(self.variant_names())
        order = [
            name for kind in TRAINING_STAGES for name in (kind, *(v for v in variants if split_name(v)[0] == kind))
        ]
        order.append("merge")
        return [stage for stage in order if stage in needed]

    def pretrain_domains(self) -> list[str]:
        """The domains pretrain reads: model.tokenizer.domains, or every domain when that is null."""
        return list(self.model.tokenizer.domains or self.data.domains)


def _deep_merge(target: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(target)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _deep_merge(merged[key], value) if both else value
    return merged


# Record shape each training stage reads from its mixture (stages/*.py).
STAGE_FORMATS = {
    "pretrain": ("text",),
    "cpt": ("text",),
    "sft": ("prompt_completion", "conversational"),
    "dpo": ("preference",),
    "grpo": ("prompt_answer",),
}


def _chain_problems(params: Params) -> list[tuple[str, Any, str]]:
    """Each training stage's parent is an earlier training stage (pretrain starts the chain: none)."""
    problems: list[tuple[str, Any, str]] = []
    for i, stage in enumerate(TRAINING_STAGES):
        parent = getattr(params, stage).parent
        if parent is None:
            continue
        earlier = list(TRAINING_STAGES[:i])
        if parent not in earlier:
            want = (
                f"one of {earlier} (an earlier training stage) or null"
                if earlier
                else "null (pretrain starts the chain)"
            )
            problems.append((f"{stage}.parent", parent, want))
    if not params.evaluate.models:
        problems.append(("evaluate.models", [], "at least one model stage (the chain runs what evaluate needs)"))
    return problems


def _stage_order_problems(params: Params) -> list[tuple[str, Any, str]]:
    """Replay from an earlier stage only, one format per stage, no model listed twice."""
    problems: list[tuple[str, Any, str]] = []
    for name, mixture in params.mixtures.items():
        stage = split_name(name)[0]  # a variant's mixture (`sft@arith`) has its stage's format
        if stage in STAGE_FORMATS and mixture.format not in STAGE_FORMATS[stage]:
            want = " or ".join(f"'{f}'" for f in STAGE_FORMATS[stage])
            problems.append((f"mixtures.{name}.format", mixture.format, f"{want} (what {stage} trains on)"))
        if mixture.replay and name in TRAINING_STAGES and mixture.replay.from_stage in TRAINING_STAGES:
            earlier = list(TRAINING_STAGES[: TRAINING_STAGES.index(name)])
            if mixture.replay.from_stage not in earlier:
                want = f"an earlier training stage, one of {earlier}" if earlier else "no replay (nothing comes before)"
                problems.append((f"mixtures.{name}.replay.from_stage", mixture.replay.from_stage, want))
    for key, stages in (("merge.models", params.merge.models), ("evaluate.models", params.evaluate.models)):
        seen: set[str] = set()
        for i, stage in enumerate(stages):
            if stage in seen:
                problems.append((f"{key}[{i}]", stage, "each stage at most once (it is listed twice)"))
            seen.add(stage)
    return problems


# --------------------------------------------------------------------------- loading


def _format_location(loc: tuple[Any, ...]) -> str:
    """('data', 'domains', 'add', 'addition', 'digits') -> 'data.domains.add.digits'.

    Pydantic puts the discriminator's tag into the location of union members; drop it.
    """
    parts: list[str] = []
    previous: Any = None
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        # The item right after `domains` is the domain's own name, which may equal a tag (a domain named lore).
        elif item in DOMAIN_KINDS and parts and previous not in ("kind", "domains"):
            pass
        else:
            parts.append(("." if parts else "") + str(item))
        previous = item
    return "".join(parts)


DOMAIN_KINDS = ("addition", "subtraction", "reverse", "chain", "lore", "file", "hub")


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: {error.error_count()} invalid setting(s)"]
    for item in error.errors():
        path = _format_location(item["loc"]) or "(top level)"
        kind = item["type"]
        if kind == "extra_forbidden":
            lines.append(f"  {path}: unknown key (value {item['input']!r})")
        elif kind == "missing":
            lines.append(f"  {path}: required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"  {path}: {message} (got {item['input']!r})" if path != "(top level)" else f"  {message}")
    return "\n".join(lines)


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_format_errors(source, error)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last; DVC refuses)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}; expected each key once per mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ParamsError(
            f"{path}: line {line}: byte 0x{data[error.start]:02x} is not valid UTF-8; expected a UTF-8 encoded file"
        ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ParamsError(f"{path}: malformed YAML{where}: {problem}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raises ParamsError naming every bad key."""
    return parse_params(read_yaml(path), source=str(path))


def params_hash(section: BaseModel | dict[str, Any]) -> str:
    """Stable hash of a config section (recorded in lineage so a model says exactly what made it)."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def set_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` to a raw params mapping (value parsed as YAML), as `dvc exp run -S` does."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ParamsError(f"override {assignment!r}: expected KEY=VALUE, e.g. sft.trainer.learning_rate=1e-4")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ParamsError(f"override {assignment!r}: '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ParamsError(f"override {assignment!r}: the value is not valid YAML ({problem})") from None
