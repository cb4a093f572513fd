"""Typed schema for params.yaml.

Every knob of every stage lives in params.yaml; this module is the only place that reads it.
Loading validates the whole file before any work starts, and every error names the key path,
the bad value and what was expected. Importing this module must stay cheap (no torch, no trl):
`posttrain validate` has to answer in about a second.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.data.verifiers import VERIFIERS
from posttrain.errors import ParamsError
from posttrain.scoring.rewards import REWARDS

STAGE_NAMES = ("prepare", "mix", "pretrain", "cpt", "sft", "dpo", "grpo", "merge", "evaluate")
MODEL_STAGES = ("pretrain", "cpt", "sft", "dpo", "grpo", "merge")
TRAINING_STAGES = ("pretrain", "cpt", "sft", "dpo", "grpo")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
OpenFraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class Strict(BaseModel):
    """Unknown keys are errors; configs are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- compute and model


class ComputeConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 on a GPU that supports it, fp32 on CPU (bf16 is emulated, ~7.5x slower there).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # 0 = let the stage pick (all cores, at most 8, for small CPU machines).
    num_threads: NonNegInt = 0
    # "accelerate" wraps each trainer stage in `accelerate launch --config_file <accelerate_config>`.
    launcher: Literal["python", "accelerate"] = "python"
    accelerate_config: str | None = None

    @model_validator(mode="after")
    def _launcher_needs_config(self) -> ComputeConfig:
        if self.launcher == "accelerate" and not self.accelerate_config:
            raise ValueError("compute.launcher is 'accelerate' but compute.accelerate_config is not set")
        return self


class TokenizerConfig(Strict):
    """Used only when model.base is 'scratch': a BPE tokenizer trained on the pipeline's own data."""

    vocab_size: Annotated[int, Field(ge=32, le=1_000_000)] = 96
    min_frequency: PositiveInt = 2


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

    @field_validator("chat_template")
    @classmethod
    def _template_named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty; expected 'base', 'chatml' or a path to a Jinja file")
        return value


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


class AdditionDomain(_SyntheticDomain):
    kind: Literal["addition"]
    digits: Annotated[int, Field(ge=1, le=12)] = 2
    n_items: PositiveInt = 4000


class SubtractionDomain(_SyntheticDomain):
    kind: Literal["subtraction"]
    digits: Annotated[int, Field(ge=1, le=12)] = 2
    n_items: PositiveInt = 4000


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
    split: str = "train"
    columns: dict[str, str] = {}
    max_items: PositiveInt | None = None
    # Drop rows that fail validation instead of failing the stage (counted and reported).
    skip_bad_rows: bool = False

    _columns = field_validator("columns")(_check_columns)


DomainConfig = Annotated[
    AdditionDomain | SubtractionDomain | ReverseDomain | FileDomain | HubDomain,
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
        return domains


class ReplayConfig(Strict):
    """Mix in data another stage was trained on (continual pretraining with replay)."""

    from_stage: str
    fraction: OpenFraction = 0.25


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


class TrainStageConfig(Strict):
    trainer: TrainerArgs = TrainerArgs()
    schedule: ScheduleConfig = ScheduleConfig()
    max_length: PositiveInt = 64
    # Memory levers. None: TRL's default (forced off on CPU, where it only slows a small model).
    gradient_checkpointing: bool | None = None
    # Pack several examples into each max_length row (SFTTrainer stages only: pretrain, cpt, sft).
    packing: bool = False
    # null: full fine-tuning; else train a LoRA adapter (see LoRAConfig.handoff for what is written).
    lora: LoRAConfig | None = None
    # A training example longer than max_length: cut it, or stop the stage.
    on_too_long: Literal["truncate", "refuse"] = "refuse"
    # Continual evaluation: every N optimizer steps (0 = off) score each domain's validation set.
    eval_every: NonNegInt = 0
    eval_items: PositiveInt = 64


class DPOStageConfig(TrainStageConfig):
    # offline: chosen = verified answer, rejected = a plausible wrong answer.
    # on_policy: sample the input model, pair a correct sample with an incorrect one.
    pairs: Literal["offline", "on_policy"] = "offline"
    on_policy_samples: Annotated[int, Field(ge=2)] = 8
    beta: Annotated[float, Field(gt=0.0)] = 0.1


class RewardSpec(Strict):
    name: str
    weight: float = 1.0


class GRPOStageConfig(TrainStageConfig):
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


class MergeConfig(Strict):
    method: Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "checkpoint_average"] = (
        "linear"
    )
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
    seed: int = 0

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
        if self.method in ("task_arithmetic", "ties", "dare_linear", "dare_ties") and not self.base:
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
    seed: int = 0
    # Off unless set: lm-eval scores (with stderr) go into eval.json under `lm_eval`.
    lm_eval: LmEvalConfig | None = None


# --------------------------------------------------------------------------- tracking and promotion


class TrackingConfig(Strict):
    enabled: bool = True
    # None: a SQLite store in the project (mlflow.db) unless MLFLOW_TRACKING_URI is set.
    tracking_uri: str | None = None
    experiment: str = "posttrain"
    # Registered model name is "<registered_model_prefix>-<stage>".
    registered_model_prefix: str = "posttrain"


class PromotionConfig(Strict):
    # The stage whose model is the pipeline's final model (gets the `candidate` alias).
    final_stage: str = "merge"
    min_exact_match: dict[str, Fraction] = {}
    max_forgetting: dict[str, Fraction] = {}
    # Candidate must beat the champion on this domain by at least `min_improvement`, judged with CIs.
    compare_domain: str | None = None
    min_improvement: float = 0.0


# --------------------------------------------------------------------------- orchestration


class ContinualConfig(Strict):
    # New data files dropped here trigger continual pretraining + downstream + evaluation + gate.
    incoming_dir: str = "data/incoming"
    # Domain the incoming files are registered under.
    domain: str = "incoming"
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
    seed: int = 1234
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

    @model_validator(mode="after")
    def _cross_references(self) -> Params:
        """Names used in one section must exist in another; errors carry the full key path."""
        domains = set(self.data.domains)
        problems: list[tuple[str, Any, str]] = []
        for stage in TRAINING_STAGES:
            if stage not in self.mixtures:
                problems.append((f"mixtures.{stage}", None, f"a mixture for training stage '{stage}'"))
        for name, mixture in self.mixtures.items():
            if name not in TRAINING_STAGES:
                problems.append((f"mixtures.{name}", name, f"one of {list(TRAINING_STAGES)}"))
            for domain in mixture.weights:
                if domain not in domains:
                    problems.append((f"mixtures.{name}.weights.{domain}", domain, f"a domain in {sorted(domains)}"))
            if mixture.replay and mixture.replay.from_stage not in self.mixtures:
                problems.append(
                    (f"mixtures.{name}.replay.from_stage", mixture.replay.from_stage, f"one of {sorted(self.mixtures)}")
                )
        for i, stage in enumerate(self.merge.models):
            if stage not in TRAINING_STAGES:
                problems.append((f"merge.models[{i}]", stage, f"one of {list(TRAINING_STAGES)}"))
        if self.merge.base is not None and self.merge.base not in TRAINING_STAGES:
            problems.append(("merge.base", self.merge.base, f"one of {list(TRAINING_STAGES)}"))
        for i, stage in enumerate(self.evaluate.models):
            if stage not in MODEL_STAGES:
                problems.append((f"evaluate.models[{i}]", stage, f"one of {list(MODEL_STAGES)}"))
        for i, domain in enumerate(self.evaluate.domains):
            if domain not in domains:
                problems.append((f"evaluate.domains[{i}]", domain, f"a domain in {sorted(domains)}"))
        for key in ("min_exact_match", "max_forgetting"):
            for domain in getattr(self.promotion, key):
                if domain not in domains:
                    problems.append((f"promotion.{key}.{domain}", domain, f"a domain in {sorted(domains)}"))
        if self.promotion.final_stage not in MODEL_STAGES:
            problems.append(("promotion.final_stage", self.promotion.final_stage, f"one of {list(MODEL_STAGES)}"))
        for stage in self.orchestration.retries:
            if stage.split("@")[0] not in STAGE_NAMES:
                problems.append((f"orchestration.retries.{stage}", stage, f"a stage in {list(STAGE_NAMES)}"))
        if problems:
            raise ValueError("; ".join(f"{path}: got {value!r}, expected {want}" for path, value, want in problems))
        return self

    def stage_section(self, stage: str) -> BaseModel:
        return getattr(self, stage)


# --------------------------------------------------------------------------- loading


def _format_location(loc: tuple[Any, ...]) -> str:
    """('data', 'domains', 'add', 'addition', 'digits') -> 'data.domains.add.digits'.

    Pydantic puts the discriminator's tag into the location of union members; drop it.
    """
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        if item in ("addition", "subtraction", "reverse", "file", "hub") and parts and parts[-1] != "kind":
            continue
        parts.append(("." if parts else "") + str(item))
    return "".join(parts)


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


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        return yaml.safe_load(path.read_text())
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
    node[parts[-1]] = yaml.safe_load(value)
