"""A bare TRL script for any trainer stage: the TRL trainer called directly on the same model, data
and settings as the pipeline's `pretrain`, `cpt`, `sft`, `dpo` or `grpo` stage.

What a user would write without the pipeline: load the input model folder (for `pretrain`: train a
BPE tokenizer on the prepared texts and build a Llama from `model.architecture`, as stages/pretrain.py
does), read the stage's mixture parquet, build SFTConfig / DPOConfig / GRPOConfig from the same
`<stage>.trainer` keys of params.yaml, train, save. It reproduces the stage's set-up exactly where it
changes numbers: device and precision (fp32 on CPU, activation checkpointing off there), torch
threads, seed and data_seed, the pipeline's defaults for keys params.yaml leaves out, max_length,
the stage's own TRL fields (sft: completion-only loss, or on conversations assistant-only loss;
dpo: beta and a second copy of the input model as the frozen reference; grpo: num_generations,
max_completion_length, temperature, beta, reward weights) and the recipe's learning-rate schedule
(every shape of posttrain.training.schedules, with its (step + 1) / warmup warm-up). For the same
seed and steps its final train loss must therefore equal the stage's.

Conversational mixtures (the SmolLM2 recipe, `configs/smollm2-135m.yaml`) as a TRL user feeds them:
SFT rows as TRL's `messages` lists (TRL applies the input model's chat template; loss on assistant
turns only), DPO and GRPO prompts through `tokenizer.apply_chat_template(..., add_generation_prompt=True)`
and DPO's chosen/rejected as the text of their one assistant turn (TRL appends the EOS, the
template's end-of-turn token).

It has none of the pipeline's extras: no hash or length checks, no continual evaluation, no
checkpoint keys or resume, no lineage, no MLflow; it imports neither posttrain.training nor
posttrain.pipeline.entry. The one pipeline import is GRPO's reward functions, taken from posttrain.scoring.rewards
(a user would write their own `f(completions, answer, **columns) -> list[float]`; these are plain
functions of that shape). Not supported: `model.base` other than scratch for pretrain (the stage
then trains nothing), `<stage>.lora`, and `dpo.pairs: on_policy` (its pairs come from the pipeline's
sampler, posttrain.training.preferences).

tokens_seen is counted as the stage counts it: for SFT (pretrain, cpt, sft) and DPO TRL's
`state.num_input_tokens_seen` with include_num_input_tokens_seen="non_padding" (the non-padding
tokens of each batch; for DPO of the chosen and rejected sequences, each with its prompt), for GRPO
TRL's own `num_tokens` log (prompt tokens + sampled completion tokens; transformers' counter sees
no `input_ids` in GRPO's batches). Peak memory: the process's ru_maxrss, and on CUDA
torch.cuda.max_memory_allocated.

    python bench/bare_trl.py --stage {pretrain,cpt,sft,dpo,grpo} --root <finished project>
        [--params P] [--max-steps N] [--threads T] [--output-dir D] [--json out.json] [--settings JSON]

On a GPU, `--settings` takes the stage's resolved GPU settings (its metrics.json `gpu_settings`,
posttrain.runtime / training.trl_config) so that both sides run with the same attention implementation,
kernels, TF32, torch.compile, packing and activation checkpointing (bench/gpu_check.py passes them).
"""

from __future__ import annotations

import time

PROCESS_STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

STAGES = ("pretrain", "cpt", "sft", "dpo", "grpo")
PARENT = {"cpt": "pretrain", "sft": "cpt", "dpo": "sft", "grpo": "dpo"}

# The pipeline's defaults (posttrain.config) for keys a params.yaml may leave out: they differ from
# TRL's (e.g. TRL's learning rate is 2e-5 for SFT, 1e-6 for DPO/GRPO).
TRAINER_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "max_steps": 100,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "logging_steps": 10,
    "save_steps": 100,
}
SCHEDULE_DEFAULTS: dict[str, Any] = {
    "name": "cosine",
    "warmup_fraction": 0.05,
    "decay_fraction": 0.2,
    "cooldown_fraction": 0.2,
    "constant_ratio": 0.5,
    "min_lr_ratio": 0.0,
}
GRPO_DEFAULTS: dict[str, Any] = {
    "rewards": [{"name": "exact_match", "weight": 1.0}],
    "num_generations": 8,
    "max_completion_length": 8,
    "temperature": 1.0,
    "beta": 0.0,
}
MAX_LENGTH_DEFAULT = 64
DPO_BETA_DEFAULT = 0.1


# --------------------------------------------------------------------------- learning-rate schedule


def lr_multiplier(step: int, total: int, schedule: dict[str, Any]) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`.

    The shapes of the recipe (cosine, linear, constant, wsd, constant_cooldown, infinite), warm-up
    (step + 1) / warmup; HF's own schedulers start from 0 at step 0, a one-step shift.
    """
    s = {**SCHEDULE_DEFAULTS, **schedule}
    name, floor = s["name"], s["min_lr_ratio"]
    total = max(1, total)

    def steps(fraction: float) -> int:
        return int(round(fraction * total))

    def progress(at: int, start: int, length: int) -> float:
        return 1.0 if length <= 0 else min(1.0, max(0.0, (at - start) / length))

    warmup = steps(s["warmup_fraction"])
    if name not in ("cosine", "linear", "constant", "wsd", "constant_cooldown", "infinite"):
        raise SystemExit(f"bare_trl.py: unknown schedule {name!r}")
    if step < warmup:
        return min(1.0, (step + 1) / warmup)
    if name == "cosine":
        p = progress(step, warmup, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    if name == "linear":
        return floor + (1.0 - floor) * (1.0 - progress(step, warmup, total - warmup))
    if name == "constant":
        return 1.0
    decay = steps(s["decay_fraction"])
    decay_start = total - decay
    if name in ("wsd", "constant_cooldown"):
        if step < decay_start:
            return 1.0
        p = progress(step + 1, decay_start, decay)
        return floor + (1.0 - floor) * (1.0 - (p if name == "wsd" else math.sqrt(p)))
    # infinite: cosine cool-down to a constant level, hold it, linear anneal over the last steps.
    cooldown = steps(s["cooldown_fraction"])
    level = max(s["constant_ratio"], floor)
    if step < warmup + cooldown:
        p = progress(step + 1, warmup, cooldown)
        return level + (1.0 - level) * 0.5 * (1.0 + math.cos(math.pi * p))
    if step < decay_start:
        return level
    return floor + (level - floor) * (1.0 - progress(step + 1, decay_start, decay))


def scheduled(trainer_cls: type, schedule: dict[str, Any]) -> type:
    """`trainer_cls` with the recipe's schedule as a LambdaLR (the Trainer still builds the optimizer)."""
    import torch

    class Scheduled(trainer_cls):  # type: ignore[misc, valid-type]
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    lambda step: lr_multiplier(step, num_training_steps, schedule),
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return Scheduled


# --------------------------------------------------------------------------- settings


def section_settings(params: dict[str, Any], stage: str, max_steps: int | None) -> dict[str, Any]:
    """The stage's section with the pipeline's defaults filled in; refuses what this script cannot mirror."""
    section = dict(params.get(stage) or {})
    if section.get("lora"):
        raise SystemExit(f"bare_trl.py: {stage}.lora is set; this script runs full fine-tuning only")
    if stage == "pretrain" and params.get("model", {}).get("base", "scratch") != "scratch":
        raise SystemExit("bare_trl.py: model.base is not 'scratch': the pretrain stage trains nothing then")
    if stage == "dpo" and section.get("pairs", "offline") != "offline":
        raise SystemExit("bare_trl.py: dpo.pairs is on_policy; only offline pairs (the mixture's) are supported")
    trainer = {**TRAINER_DEFAULTS, **(section.get("trainer") or {})}
    if max_steps is not None:
        trainer["max_steps"] = max_steps
    schedule = {**SCHEDULE_DEFAULTS, **(section.get("schedule") or {})}
    lr_multiplier(0, 1, schedule)  # an unknown shape fails before any work
    if stage == "grpo":
        section = {**GRPO_DEFAULTS, **section}
    return {**section, "trainer": trainer, "schedule": schedule}


def runtime_fields(compute: dict[str, Any], seed: int) -> dict[str, Any]:
    """Device and precision as the pipeline picks them (posttrain.runtime.Runtime.trainer_fields)."""
    import torch

    cuda = torch.cuda.is_available()
    wanted = compute.get("device", "auto")
    device = "cuda" if wanted == "cuda" or (wanted == "auto" and cuda) else "cpu"
    precision = compute.get("precision", "auto")
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    fields: dict[str, Any] = {
        "use_cpu": device == "cpu",
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "seed": seed,
        "data_seed": seed,
    }
    if device == "cpu":
        fields["activation_checkpointing"] = False  # TRL's default on is ~1.6x slower for small models
    return fields


def settings_fields(settings: dict[str, Any] | None) -> dict[str, Any]:
    """TRL config fields of the GPU settings a stage resolved (its metrics' `gpu_settings`, `--settings`):
    the bare run then uses exactly the stage's tf32, torch.compile, packing and activation checkpointing."""
    if not settings:
        return {}
    fields: dict[str, Any] = {"activation_checkpointing": bool(settings.get("activation_checkpointing"))}
    if settings.get("tf32"):
        fields["tf32"] = True
    if settings.get("torch_compile"):
        fields["torch_compile"] = True
    if settings.get("packing"):
        fields.update(packing=True, packing_strategy="bfd")
    return fields


def apply_settings_to_model(model: Any, settings: dict[str, Any] | None) -> None:
    """The stage's fused kernels on the model, as a TRL user would apply them (liger-kernel's call, or `use_kernels`)."""
    kernels = (settings or {}).get("kernels", "none")
    if kernels == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    elif kernels == "hub":
        model.set_use_kernels(True)


def trl_kwargs(
    config_cls: type,
    section: dict[str, Any],
    runtime: dict[str, Any],
    output_dir: Path,
    stage_fields: dict[str, Any],
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of the TRL config: our defaults < the stage's GPU settings < the stage's fields <
    `<stage>.trainer` keys."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_cls)}
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "save_strategy": "steps",
        "logging_strategy": "steps",
        "logging_first_step": True,
        "logging_nan_inf_filter": False,
        # As the stage: GRPO's batches are prompt rows (no input_ids); its tokens come from TRL's `num_tokens` log.
        "include_num_input_tokens_seen": "no" if config_cls.__name__ == "GRPOConfig" else "non_padding",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **runtime,
        **{k: v for k, v in settings_fields(settings).items() if k in known or k == "activation_checkpointing"},
    }
    if "max_length" in known:
        kwargs["max_length"] = section.get("max_length", MAX_LENGTH_DEFAULT)
    if section.get("gradient_checkpointing") is not None:
        kwargs["activation_checkpointing"] = section["gradient_checkpointing"]
    if section.get("packing"):
        kwargs["packing"] = True
    kwargs.update(stage_fields)
    kwargs.update(section["trainer"])
    if kwargs.get("use_vllm") and runtime["use_cpu"]:
        kwargs["use_vllm"] = False  # as the stage: vLLM needs CUDA, ordinary generation otherwise
    if (
        "activation_checkpointing" in kwargs
        and "activation_checkpointing" not in known
        and "gradient_checkpointing" in known
    ):
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")  # older transformers' name
    return kwargs


# --------------------------------------------------------------------------- models and data


def scratch_model(root: Path, params: dict[str, Any]) -> tuple[Any, Any]:
    """What stages/pretrain.py builds: a BPE tokenizer (single digits, isolated punctuation) trained on
    every domain's prepared train texts, and a randomly initialised Llama sized by model.architecture.
    Call after set_seed: the initial weights come from torch's RNG."""
    import pandas as pd
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_cfg = params["model"]
    arch = model_cfg["architecture"]
    tok_cfg = model_cfg.get("tokenizer") or {}
    space = "\u2581"
    specials = ["<pad>", "</s>", "<unk>"]

    def texts():
        for domain in params["data"]["domains"]:
            path = root / "artifacts" / "data" / "prepared" / domain / "train.parquet"
            yield from pd.read_parquet(path, columns=["text"])["text"].tolist()

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=space, prepend_scheme="never", split=True),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    bpe.decoder = decoders.Metaspace(replacement=space, prepend_scheme="never", split=True)
    bpe.train_from_iterator(
        texts(),
        trainer=trainers.BpeTrainer(
            vocab_size=tok_cfg.get("vocab_size", 96),
            min_frequency=tok_cfg.get("min_frequency", 2),
            special_tokens=specials,
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=arch["max_position_embeddings"],
        padding_side="right",
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_hidden_layers"],
        num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_key_value_heads"],
        max_position_embeddings=arch["max_position_embeddings"],
        rope_theta=arch["rope_theta"],
        tie_word_embeddings=arch["tie_word_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_folder(folder: Path, trust_remote_code: bool, attn_implementation: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        folder, use_safetensors=True, trust_remote_code=trust_remote_code, **attention
    )
    return model, tokenizer


def mixture_frame(root: Path, stage: str) -> tuple[Any, bool]:
    """The stage's mixture parquet, and whether the mix stage wrote it as conversations (its manifest)."""
    import pandas as pd

    folder = root / "artifacts" / "data" / "mixtures" / stage
    manifest = json.loads((folder / "manifest.json").read_text())
    return pd.read_parquet(folder / "train.parquet"), bool(manifest.get("conversational"))


def mixture(root: Path, stage: str, columns: list[str]) -> Any:
    import datasets

    frame, _ = mixture_frame(root, stage)
    return datasets.Dataset.from_pandas(frame[columns], preserve_index=False)


def sft_data(root: Path) -> tuple[Any, dict[str, Any]]:
    """SFT rows and loss mask as TRL wants them: `messages` lists (assistant-only loss), conversational or
    plain prompt/completion (completion-only loss). Stored message lists are JSON strings."""
    import datasets

    frame, chat = mixture_frame(root, "sft")
    if not chat:
        return mixture(root, "sft", ["prompt", "completion"]), {"completion_only_loss": True}
    if "messages" in frame.columns:
        rows = [{"messages": json.loads(m)} for m in frame["messages"]]
        return datasets.Dataset.from_list(rows), {"assistant_only_loss": True, "completion_only_loss": False}
    rows = [
        {"prompt": json.loads(p), "completion": json.loads(c)}
        for p, c in zip(frame["prompt"], frame["completion"], strict=True)
    ]
    return datasets.Dataset.from_list(rows), {"completion_only_loss": True}


def prompt_rows(root: Path, stage: str, columns: list[str], tokenizer: Any) -> Any:
    """DPO / GRPO rows; on a conversational mixture the prompt turns go through the chat template (generation
    prompt on) and chosen/rejected become the text of their single assistant turn."""
    import datasets

    frame, chat = mixture_frame(root, stage)
    rows = frame[columns].to_dict("records")
    if chat:
        for row in rows:
            row["prompt"] = tokenizer.apply_chat_template(
                json.loads(row["prompt"]), add_generation_prompt=True, tokenize=False
            )
            for side in ("chosen", "rejected"):
                if side in row:
                    (turn,) = json.loads(row[side])
                    row[side] = turn["content"]
    return datasets.Dataset.from_list(rows)


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--root", required=True, type=Path, help="a finished project (its artifacts/ are read)")
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: <root>/params.yaml)")
    parser.add_argument("--max-steps", type=int, default=None, help="override <stage>.trainer.max_steps")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: compute.num_threads or cores, at most 8)"
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="checkpoints and final model (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--settings",
        type=json.loads,
        default=None,
        help="the GPU settings a stage resolved (its metrics.json `gpu_settings`, as JSON): attention, kernels, "
        "tf32, torch.compile, packing, activation checkpointing; default: the CPU set-up above",
    )
    args = parser.parse_args(argv)
    settings = args.settings
    stage, root = args.stage, args.root.resolve()

    import datasets
    import torch
    import yaml
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    imported = time.perf_counter()
    params = yaml.safe_load((args.params or root / "params.yaml").read_text())
    section = section_settings(params, stage, args.max_steps)
    seed = params["seed"]
    compute = params.get("compute") or {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or compute.get("num_threads") or min(cores, 8)
    torch.set_num_threads(threads)
    set_seed(seed)
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    runtime = runtime_fields(compute, seed)
    trust = bool((params.get("model") or {}).get("trust_remote_code", False))

    attention = (settings or {}).get("attn_implementation")
    if stage == "pretrain":
        model, tokenizer = scratch_model(root, params)
    else:
        model, tokenizer = load_folder(root / "artifacts" / "models" / PARENT[stage], trust, attention)
    apply_settings_to_model(model, settings)

    trainer_kwargs: dict[str, Any] = {}
    if stage in ("pretrain", "cpt", "sft"):
        from trl import SFTConfig as config_cls
        from trl import SFTTrainer as trainer_cls

        if stage == "sft":
            dataset, stage_fields = sft_data(root)
        else:
            dataset, stage_fields = mixture(root, stage, ["text"]), {}
    elif stage == "dpo":
        from trl import DPOConfig as config_cls
        from trl import DPOTrainer as trainer_cls

        dataset = prompt_rows(root, stage, ["prompt", "chosen", "rejected"], tokenizer)
        stage_fields = {"beta": section.get("beta", DPO_BETA_DEFAULT)}
        # The frozen reference: a second copy of the input model.
        trainer_kwargs["ref_model"] = load_folder(root / "artifacts" / "models" / PARENT[stage], trust, attention)[0]
    else:
        from trl import GRPOConfig as config_cls
        from trl import GRPOTrainer as trainer_cls

        from posttrain.scoring.rewards import REWARDS  # plain reward functions; a user would write their own

        dataset = prompt_rows(root, stage, ["prompt", "answer"], tokenizer)
        specs = section["rewards"]
        trainer_kwargs["reward_funcs"] = [REWARDS[spec["name"]] for spec in specs]
        stage_fields = {
            "num_generations": section["num_generations"],
            "max_completion_length": section["max_completion_length"],
            "temperature": section["temperature"],
            "beta": section["beta"],
            "reward_weights": [float(spec.get("weight", 1.0)) for spec in specs],
        }

    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix=f"bare-{stage}-"))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    config = config_cls(**trl_kwargs(config_cls, section, runtime, output_dir, stage_fields, settings))
    trainer = scheduled(trainer_cls, section["schedule"])(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, **trainer_kwargs
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    trainer.save_model(str(output_dir / "final"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    logged_tokens = max((int(e["num_tokens"]) for e in trainer.state.log_history if "num_tokens" in e), default=0)
    tokens = trainer.state.num_input_tokens_seen or logged_tokens
    steps = trainer.state.global_step
    result = {
        "stage": stage,
        "final_train_loss": losses[-1] if losses else None,
        "first_train_loss": losses[0] if losses else None,
        "steps": steps,
        "train_seconds": round(train_seconds, 3),
        "steps_per_second": round(steps / train_seconds, 3),
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / train_seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "device": "cpu" if runtime["use_cpu"] else "cuda",
        "import_seconds": round(imported - PROCESS_STARTED, 3),
        "in_process_seconds": round(time.perf_counter() - PROCESS_STARTED, 3),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "max_steps": section["trainer"]["max_steps"],
        "settings": settings,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.output_dir is None:
        shutil.rmtree(output_dir, ignore_errors=True)
    return result


if __name__ == "__main__":
    if __package__ in (None, ""):  # `python bench/bare_trl.py`: posttrain.scoring.rewards (grpo) from the repo root
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
