"""GPU check of the generation engines: hf against paged rollouts, and the GRPO step split with each.

    bench/rollout_check.sh                # one H100/H200: the check (planned <= 8 min)
    bench/rollout_check.sh --cpu-smoke    # the same code at toy size on CPU (CI, well under 2 min)

Model: a Llama config of ~0.5B parameters with random weights (throughput does not depend on what
the weights learned) and the SmolLM2 tokenizer (`--tokenizer`, else .whl/rollout/tokenizer or
models/smollm2-135m-instruct), bf16 on CUDA; the smoke: a toy Llama with a 512-word tokenizer, fp32.

1. Rollouts: `prompts` x `samples` rollouts (gpu: 32 x 8 = 256) of exactly `new_tokens` tokens
   (gpu: 256; EOS is not a stop token here, so every engine generates the same number) through
   posttrain.scoring.engines, sampled at temperature 1, each engine once to warm up and then
   `repeats` times alternating; generated tokens/s per run and the paged / hf ratio per repeat.
   Greedy agreement: the same prompts, greedy, hf against paged, token for token.
2. GRPO: TRL's GRPOTrainer (timed by posttrain.training.rollout_timing) with the same rollouts per
   step (generation batch = prompts x samples, max_completion_length = new_tokens) on hf (TRL's
   `generate`) and paged (TRL's `use_transformers_continuous_batching`); `grpo_steps` optimizer
   steps each, the first one a warm-up left out of the split.

Targets (docs/generation.md): paged >= 2x hf tokens/s; paged >= 10x the recipe's GRPO tokens/s on
the lent H200 (artifacts/bench/gpu_recipe_smollm2.json); generation <= 60% of a paged GRPO step;
greedy agreement >= 99%. The smoke mode reports the same figures and judges none of them.
Writes one JSON: artifacts/bench/rollout_check.json (rollout_check_cpu_smoke.json with --cpu-smoke).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, log, machine_info, median, now, read_json

CONFIGS: dict[str, dict[str, Any]] = {
    # ~0.5B parameters with SmolLM2's 49,152-token vocabulary: 24 x (4 x 1024^2 + 3 x 1024 x 4096)
    # = 403M in the layers + 2 x 49,152 x 1024 = 101M in the (untied) embeddings.
    "gpu": {
        "model": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False),
        "precision": "bf16", "prompts": 32, "samples": 8, "prompt_tokens": 64, "new_tokens": 256,
        "repeats": 3, "agreement_prompts": 256, "agreement_tokens": 32,
        "grpo_steps": 3, "micro_batch": 32,
    },
    "cpu-smoke": {
        "model": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False),
        "precision": "fp32", "prompts": 4, "samples": 4, "prompt_tokens": 16, "new_tokens": 16,
        "repeats": 1, "agreement_prompts": 16, "agreement_tokens": 8,
        "grpo_steps": 2, "micro_batch": 8,
    },
}  # fmt: skip
TARGETS = {"paged_over_hf": 2.0, "paged_over_recipe_grpo": 10.0, "generation_share": 0.60, "agreement": 0.99}
ENGINES = ("hf", "paged")
RECIPE_GPU_RUN = REPO / "artifacts" / "bench" / "gpu_recipe_smollm2.json"
TOKENIZERS = (REPO / ".whl" / "rollout" / "tokenizer", REPO / "models" / "smollm2-135m-instruct")


def load_tokenizer(path: Path | None, smoke: bool, vocab: int = 512) -> Any:
    """`path`, else: the SmolLM2 tokenizer (the first of TOKENIZERS that exists) on a GPU, a word-level
    tokenizer of `vocab` ids for the smoke (bench.common.word_tokenizer: a 49k-token output layer would
    be most of a toy model's time)."""
    from transformers import AutoTokenizer

    if smoke and path is None:
        from bench.common import word_tokenizer

        return word_tokenizer(vocab)
    found = path or next((p for p in TOKENIZERS if (p / "tokenizer.json").is_file()), None)
    if found is None:
        raise SystemExit(f"no tokenizer: pass --tokenizer DIR or run bench/rollout_wheels.sh (looked in {TOKENIZERS})")
    return AutoTokenizer.from_pretrained(found)


def build_model(config: dict[str, Any], tokenizer: Any, device: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None,
        **config["model"],
    )  # fmt: skip
    dtype = torch.bfloat16 if config["precision"] == "bf16" else torch.float32
    with torch.device(device):  # initialised where it runs: 0.5B random weights on a CPU take a while
        model = LlamaForCausalLM(llama).to(dtype)
    # No EOS: every rollout runs its full length, so both engines generate the same number of tokens.
    model.generation_config.eos_token_id = None
    return model


def make_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids, drawn from the vocabulary (no special tokens)."""
    import random

    rng = random.Random(0)
    special = set(tokenizer.all_special_ids)
    usable = [i for i in range(len(tokenizer)) if i not in special]
    return [[rng.choice(usable) for _ in range(length)] for _ in range(count)]


def measure_rollouts(model: Any, tokenizer: Any, config: dict[str, Any]) -> dict[str, Any]:
    from posttrain.scoring.engines import GenerationRequest, GenerationStats, timed_run

    prompts = make_prompts(tokenizer, config["prompts"], config["prompt_tokens"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = config["prompts"] * config["samples"]
    request = GenerationRequest(
        max_new_tokens=config["new_tokens"], eos_id=None, pad_id=pad, do_sample=True, temperature=1.0,
        n=config["samples"], seed=0, batch_size=rows,
    )  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    for repeat in range(config["repeats"] + 1):  # repeat 0: warm-up, not reported
        for engine in ENGINES:
            stats = GenerationStats()
            timed_run(engine, model, tokenizer, prompts, request, stats=stats)
            if repeat:
                runs[engine].append(stats.as_dict())
                log(f"rollouts {engine} repeat {repeat}: {stats.as_dict()}")
    rates = {e: [r["tokens_per_second"] for r in runs[e]] for e in ENGINES}
    ratios = [p / h for p, h in zip(rates["paged"], rates["hf"], strict=True)]

    # Greedy agreement, token for token, on other prompts.
    greedy = GenerationRequest(max_new_tokens=config["agreement_tokens"], eos_id=None, pad_id=pad, batch_size=rows)
    agreement_prompts = make_prompts(tokenizer, config["agreement_prompts"], config["prompt_tokens"])
    ids = {e: [g[0] for g in timed_run(e, model, tokenizer, agreement_prompts, greedy)] for e in ENGINES}
    same = [a == b for a, b in zip(ids["hf"], ids["paged"], strict=True)]
    first = [next((k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None) for a, b in
             zip(ids["hf"], ids["paged"], strict=True)]  # fmt: skip
    return {
        "rollouts_per_run": rows,
        "tokens_per_rollout": config["new_tokens"],
        "runs": runs,
        "tokens_per_second": {e: round(median(rates[e]), 1) for e in ENGINES},
        "paged_over_hf": {
            "median": round(median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
            "std": round(statistics.stdev(ratios), 3) if len(ratios) > 1 else 0.0,
        },  # fmt: skip
        "greedy_agreement": {
            "prompts": len(same),
            "tokens": config["agreement_tokens"],
            "sequences_identical": round(sum(same) / len(same), 4),
            "first_difference_positions": [k for k in first if k is not None],
        },
    }


def no_checkpointing(config_cls: type) -> dict[str, bool]:
    """TRL turns activation checkpointing on; off here (the check measures speed, memory is plenty). The
    field is `activation_checkpointing` in transformers 5.23, `gradient_checkpointing` in 5.17."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def measure_grpo(model: Any, tokenizer: Any, config: dict[str, Any], engine: str, device: str) -> dict[str, Any]:
    """`grpo_steps` steps of TRL's GRPOTrainer generating with `engine`; the split of the steps after the first."""
    import tempfile

    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.scoring.engines import paged_cache
    from posttrain.training.rollout_timing import RolloutTiming, split_summary, timed_trainer

    prompts = [tokenizer.decode(ids) for ids in make_prompts(tokenizer, 64, config["prompt_tokens"])]

    def distinct_tokens(completions: list[str], **_: Any) -> list[float]:
        return [len(set(c.split())) / 100.0 for c in completions]

    timing = RolloutTiming()
    rollouts, new = config["prompts"] * config["samples"], config["new_tokens"]
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, max_steps=config["grpo_steps"], learning_rate=1e-6, num_generations=config["samples"],
            per_device_train_batch_size=config["micro_batch"],
            gradient_accumulation_steps=rollouts // config["micro_batch"],  # one generation batch per step
            max_completion_length=new, temperature=1.0, beta=0.0,
            use_transformers_continuous_batching=engine == "paged",
            # The stage's cache sizing (posttrain.scoring.engines.paged_cache), as stages/grpo.py passes it;
            # decoded random ids may re-tokenize longer: room for twice the prompt.
            transformers_continuous_batching_config=paged_cache(model, [2 * config["prompt_tokens"] + new] * rollouts),
            bf16=config["precision"] == "bf16", use_cpu=device == "cpu", **no_checkpointing(GRPOConfig),
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = timed_trainer(GRPOTrainer)(
            model=model, args=args, train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
            reward_funcs=[distinct_tokens], processing_class=tokenizer, rollout_timing=timing,
        )  # fmt: skip
        trainer.train()
    for step in timing.steps:
        log(f"grpo {engine} step {step.step}: {step.as_row()}")
    return {
        "rollouts_per_step": rollouts,
        "steps": [s.as_row() for s in timing.steps],
        "split": split_summary(timing.steps[1:] or timing.steps),  # the first step warms up
    }


def recipe_grpo_tokens_per_second() -> dict[str, Any] | None:
    """The current recipe's GRPO tokens/s on the lent H200 (TRL's prompt + completion tokens per second)."""
    if not RECIPE_GPU_RUN.is_file():
        return None
    run = read_json(RECIPE_GPU_RUN)
    return {
        "tokens_per_second": run["recipe"]["stages"]["grpo"]["tokens_per_second"],
        "source": RECIPE_GPU_RUN.relative_to(REPO).as_posix(),
        "gpu": run.get("gpu") or run.get("machine", {}).get("gpu"),
    }


def judge(result: dict[str, Any]) -> dict[str, Any]:
    """Each target against the figures of this run (GPU runs only)."""
    rollouts, grpo = result["rollouts"], result["grpo"]
    recipe = result["recipe_grpo"]
    paged_rate = rollouts["tokens_per_second"]["paged"]
    return {
        "paged_over_hf": {"value": rollouts["paged_over_hf"]["median"], "target": TARGETS["paged_over_hf"]},
        "paged_over_recipe_grpo": {
            "value": round(paged_rate / recipe["tokens_per_second"], 2) if recipe else None,
            "target": TARGETS["paged_over_recipe_grpo"],
            "note": "the recipe's figure counts prompt + completion tokens per training second (TRL's num_tokens)",
        },
        "generation_share_paged": {
            "value": grpo["paged"]["split"]["share"]["generation"],
            "target": TARGETS["generation_share"],
            "at_most": True,
        },  # fmt: skip
        "greedy_agreement": {
            "value": rollouts["greedy_agreement"]["sequences_identical"],
            "target": TARGETS["agreement"],
        },  # fmt: skip
    }


def render(result: dict[str, Any]) -> str:
    """The docs table (docs/generation.md) from a result JSON."""
    r, g = result["rollouts"], result["grpo"]
    lines = [
        f"{result['device']}, {result['config']['precision']}, {r['rollouts_per_run']} rollouts x "
        f"{r['tokens_per_rollout']} tokens:",
        "",
        "| engine | rollout tokens/s | GRPO step s | generation | reward | scoring | update | GRPO generation tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine in ENGINES:
        split = g[engine]["split"]
        share = split["share"]
        lines.append(
            f"| {engine} | {r['tokens_per_second'][engine]:.0f} | {split['step_seconds'] / max(split['steps'], 1):.2f} | "
            f"{share['generation']:.0%} | {share['reward']:.0%} | {share['scoring']:.0%} | {share['update']:.0%} | "
            f"{split['generation_tokens_per_second']:.0f} |"
        )
    lines += ["", f"paged / hf rollout tokens/s: {r['paged_over_hf']['median']:.2f} "
              f"(range {r['paged_over_hf']['min']:.2f}-{r['paged_over_hf']['max']:.2f}); greedy sequences "
              f"identical: {r['greedy_agreement']['sequences_identical']:.1%}"]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy size on CPU: the same code, no targets judged")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer folder (default: SmolLM2's)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write")
    parser.add_argument("--render", type=Path, default=None, help="print the docs table of this JSON and exit")
    args = parser.parse_args()
    if args.render:
        print(render(read_json(args.render)))
        return

    import torch

    if args.cpu_smoke:
        torch.set_num_threads(1)  # two threads per process collapse on a shared 2-core machine
    name = "cpu-smoke" if args.cpu_smoke else "gpu"
    config = CONFIGS[name]
    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    if name == "gpu" and device != "cuda":
        raise SystemExit("rollout_check: no CUDA device; on CPU run it with --cpu-smoke")
    out = args.out or REPO / "artifacts" / "bench" / (
        "rollout_check_cpu_smoke.json" if args.cpu_smoke else "rollout_check.json"
    )
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer, args.cpu_smoke)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = build_model(config, tokenizer, device)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"{name}: {parameters / 1e6:.1f}M parameters on {device}")
    result: dict[str, Any] = {
        "benchmark": "rollout_check",
        "mode": name,
        "measured_at": now(),
        "machine": machine_info(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "config": config,
        "parameters": parameters,
        "tokenizer": getattr(tokenizer, "name_or_path", "") or "word-level (bench.common.word_tokenizer)",
        "vllm": "not measured: vLLM's wheel (hundreds of MB, with its own CUDA torch) cannot travel with the check",
    }
    result["rollouts"] = measure_rollouts(model, tokenizer, config)
    result["grpo"] = {}
    for engine in ENGINES:
        fresh = build_model(config, tokenizer, device)  # the same seeded weights for each engine's run
        result["grpo"][engine] = measure_grpo(fresh, tokenizer, config, engine, device)
        del fresh
    result["recipe_grpo"] = recipe_grpo_tokens_per_second()
    result["targets"] = judge(result) if device == "cuda" else "not judged: CPU smoke (toy size)"
    result["seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"wrote {out} ({result['seconds']} s)")
    print(render(result))


if __name__ == "__main__":
    main()
