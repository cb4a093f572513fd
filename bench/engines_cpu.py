"""hf against paged on CPU: the SmolLM2 recipe's evaluation (configs/smollm2-135m.yaml), side by side.

The recipe's `evaluate` settings on its `add` domain (the first 200 test items, chat form through the
ChatML template, greedy, at most 6 new tokens, batch 64, pass@k n=1 on 1 item, torch threads 2), on
models/smollm2-135m-instruct with the template installed (the recipe's `pretrain` model) and on the
same model after `--sft-steps` of TRL SFT on the `add` train split (so that exact match is not 0 for
both). For each model, after an untimed warm-up of both engines, each engine runs `--repeats` times,
alternating (hf, paged, hf, paged, ...):

- agreement: completions compared item for item (token for token), and exact match per item;
  every item where the two differ is explained by the logit gap at the first token they differ
  (a near-tie: both engines' arithmetic is fp32, but summed in another order);
- speed: generated tokens/s of each engine (stats of posttrain.scoring.engines), and the whole
  `evaluate_domain` seconds; the ratio paged / hf per repeat, with median, mean, std and range.

    python bench/engines_cpu.py [--repeats 3] [--sft-steps 20] [--items 200]

Writes artifacts/bench/engines_cpu.json; `--render` prints the docs table from that JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, log, machine_info, median, now, read_json, write_result

RECIPE = REPO / "configs" / "smollm2-135m.yaml"
MODEL = REPO / "models" / "smollm2-135m-instruct"
ENGINES = ("hf", "paged")


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(median(values), 4),
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def recipe_items(items: int) -> tuple[Any, Any, Any]:
    """(params, the first `items` add test rows, the add train rows) as the recipe's prepare stage writes them."""
    import pandas as pd

    from posttrain.config import load_params
    from posttrain.layout import Layout
    from stages.evaluate import load_test_sets
    from stages.prepare import prepare

    params = load_params(RECIPE)
    with tempfile.TemporaryDirectory(prefix="engines-cpu-") as root:
        layout = Layout(Path(root))
        # Only `add` is scored: its split is a hash of each item, the same whatever else is prepared.
        prepare(params.data.model_copy(update={"domains": {"add": params.data.domains["add"]}}), layout)
        tests = load_test_sets(layout, ["add"], items)
        train = pd.read_parquet(layout.prepared_split("add", "train"))
    return params, tests["add"], train


def load_base(params: Any) -> tuple[Any, Any]:
    """SmolLM2 with the recipe's ChatML template installed: what the recipe's pretrain stage writes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models import chat_template

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    if chat_template.install(tokenizer, params.model.chat_template, REPO):
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


def finetune(model: Any, tokenizer: Any, train: Any, steps: int, seed: int) -> float:
    """`steps` of TRL SFT (conversational, assistant-only loss, batch 16, lr 5e-5) on the add train split."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from posttrain.data.formats import full_conversation

    rows = [{"messages": full_conversation(r)} for r in train.fillna("").to_dict("records")]
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, max_steps=steps, per_device_train_batch_size=16, learning_rate=5e-5, max_length=64,
            assistant_only_loss=True, use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none",
            save_strategy="no", logging_steps=max(1, steps // 5), seed=seed, disable_tqdm=True,
        )  # fmt: skip
        started = time.perf_counter()
        SFTTrainer(
            model=model, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
        ).train()
    return time.perf_counter() - started


def first_difference_gap(model: Any, prompt_ids: list[int], a: list[int], b: list[int]) -> dict[str, Any]:
    """Where two completions part and how close the model's logits of their two tokens are there."""
    import torch

    k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
    if k == min(len(a), len(b)):
        return {"position": k, "gap": None}  # one is a prefix of the other (cut by EOS)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + a[:k]])).logits[0, -1].float()
    top = logits.topk(2).values
    return {
        "position": k,
        "gap": round(abs(float(logits[a[k]] - logits[b[k]])), 6),
        "top2_gap": round(float(top[0] - top[1]), 6),
    }


def compare(name: str, model: Any, tokenizer: Any, frame: Any, params: Any, repeats: int) -> dict[str, Any]:
    """Both engines on one model: item-for-item agreement and alternating timings."""
    import pandas as pd

    from posttrain.data.verifiers import VERIFIERS
    from posttrain.scoring.engines import GenerationRequest, run_engine
    from posttrain.scoring.evaluation import EvalSettings, ModelAnswerer, evaluate_domain
    from posttrain.scoring.generation import chat_record, encode_prompts

    cfg = params.evaluate
    frame = pd.DataFrame([chat_record(tokenizer, r) for r in frame.fillna("").to_dict("records")])
    settings = EvalSettings(
        bootstrap_samples=cfg.bootstrap_samples, confidence=cfg.confidence, seed=cfg.seed, pass_n=cfg.pass_at_k.n,
        pass_k=tuple(cfg.pass_at_k.k), pass_temperature=cfg.pass_at_k.temperature, pass_max_items=cfg.pass_at_k.max_items,
    )  # fmt: skip
    for engine in ENGINES:  # untimed warm-up: the first forward passes of a process pay for allocation
        ModelAnswerer(model, tokenizer, max_new_tokens=cfg.max_new_tokens, engine=engine).greedy(
            frame["prompt"].tolist()[:8]
        )
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    completions: dict[str, list[str]] = {}
    hits: dict[str, list[float]] = {}  # exact match per item, from the first repeat
    for repeat in range(repeats):
        for engine in ENGINES:
            answerer = ModelAnswerer(
                model, tokenizer, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, engine=engine
            )
            started = time.perf_counter()
            entry, vectors = evaluate_domain(answerer, frame, VERIFIERS, settings)
            seconds = time.perf_counter() - started
            if repeat == 0:
                hits[engine] = vectors["exact_match"].tolist()
            runs[engine].append(
                {"evaluate_seconds": round(seconds, 3), "exact_match": entry["exact_match"]["mean"],
                 **answerer.stats.as_dict()}
            )  # fmt: skip
            log(f"{name} repeat {repeat + 1}/{repeats} {engine}: {runs[engine][-1]}")

    # Text and token-level agreement and, where they differ, the logit gap at the first differing token.
    for engine in ENGINES:
        completions[engine] = ModelAnswerer(
            model, tokenizer, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, engine=engine
        ).greedy(frame["prompt"].tolist())
    prompt_ids = encode_prompts(tokenizer, frame["prompt"].tolist())
    request = GenerationRequest(
        max_new_tokens=cfg.max_new_tokens, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0,
        batch_size=cfg.batch_size,
    )  # fmt: skip
    ids = {e: [g[0] for g in run_engine(e, model, tokenizer, prompt_ids, request)] for e in ENGINES}
    differ = [i for i in range(len(prompt_ids)) if ids["hf"][i] != ids["paged"][i]]
    explained = [
        {"item": i, **first_difference_gap(model, prompt_ids[i], ids["hf"][i], ids["paged"][i])} for i in differ
    ]
    rates = {e: [r["tokens_per_second"] for r in runs[e]] for e in ENGINES}
    evaluate_seconds = {e: [r["evaluate_seconds"] for r in runs[e]] for e in ENGINES}
    return {
        "items": len(frame),
        "exact_match": {e: statistics.fmean(hits[e]) for e in ENGINES},
        "exact_match_items_agree": sum(a == b for a, b in zip(hits["hf"], hits["paged"], strict=True)) / len(frame),
        "completions_agree": sum(a == b for a, b in zip(completions["hf"], completions["paged"], strict=True))
        / len(frame),
        "token_ids_agree": 1 - len(differ) / len(prompt_ids),
        "differences": explained,
        "runs": runs,
        "tokens_per_second": {e: spread(rates[e]) for e in ENGINES},
        "paged_over_hf_tokens_per_second": spread([p / h for p, h in zip(rates["paged"], rates["hf"], strict=True)]),
        "hf_over_paged_evaluate_seconds": spread(
            [h / p for h, p in zip(evaluate_seconds["hf"], evaluate_seconds["paged"], strict=True)]
        ),
    }


def default_recipe_calls(repeats: int) -> dict[str, Any]:
    """The default recipe's model size (params.yaml: a ~1M-parameter Llama, 96-token vocabulary) and its
    continual evaluation's call size (64 validation prompts per domain, a few new tokens): seconds per
    generate call of each engine, alternating, 1 torch thread as params.yaml sets."""
    import random

    import torch

    from bench.common import word_tokenizer
    from posttrain.config import load_params
    from posttrain.models.build import build_scratch_model
    from posttrain.scoring.engines import GenerationRequest, GenerationStats, timed_run

    params = load_params(REPO / "params.yaml")
    torch.set_num_threads(params.compute.num_threads)
    tokenizer = word_tokenizer(params.model.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = build_scratch_model(params.model.architecture, tokenizer).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(5, 9))] for _ in range(64)]
    request = GenerationRequest(max_new_tokens=6, eos_id=None, pad_id=tokenizer.pad_token_id, batch_size=64)
    seconds: dict[str, list[float]] = {e: [] for e in ENGINES}
    for repeat in range(repeats + 1):  # repeat 0: warm-up
        for engine in ENGINES:
            stats = GenerationStats()
            timed_run(engine, model, tokenizer, prompts, request, stats=stats)
            if repeat:
                seconds[engine].append(stats.seconds)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": params.compute.num_threads,
        "prompts_per_call": len(prompts),
        "new_tokens": request.max_new_tokens,
        "seconds_per_call": {e: spread(seconds[e]) for e in ENGINES},
        "paged_over_hf_seconds": spread([p / h for p, h in zip(seconds["paged"], seconds["hf"], strict=True)]),
    }


def render(result: dict[str, Any]) -> str:
    """The docs table (docs/generation.md), from the committed JSON."""
    lines = [
        "| model | items | exact match hf / paged | items with equal EM | equal completions (text / token ids) | "
        "hf tokens/s | paged tokens/s | paged / hf tokens/s | whole evaluation: hf s / paged s |",
        "|---|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for name, m in result["models"].items():
        hf, paged = m["tokens_per_second"]["hf"], m["tokens_per_second"]["paged"]
        ratio, whole = m["paged_over_hf_tokens_per_second"], m["hf_over_paged_evaluate_seconds"]
        lines.append(
            f"| {name} | {m['items']} | {m['exact_match']['hf']:.3f} / {m['exact_match']['paged']:.3f} | "
            f"{m['exact_match_items_agree']:.3f} | {m['completions_agree']:.3f} / {m['token_ids_agree']:.3f} | "
            f"{hf['median']:.1f} | {paged['median']:.1f} | {ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}) | "
            f"{whole['median']:.2f} ({whole['min']:.2f}-{whole['max']:.2f}) |"
        )
    lines += ["", f"Medians (ranges) over {result['repeats']} alternating repeats per engine and model."]
    tiny = result.get("default_recipe_model")
    if tiny:
        per_call = tiny["seconds_per_call"]
        lines += [
            "",
            f"The default recipe's model ({tiny['parameters'] / 1e6:.2f}M parameters, {tiny['torch_threads']} torch "
            f"thread), one continual-evaluation-sized call ({tiny['prompts_per_call']} prompts x {tiny['new_tokens']} "
            f"tokens): hf {per_call['hf']['median']:.3f} s, paged {per_call['paged']['median']:.3f} s per call "
            f"(median of {len(result['models'][next(iter(result['models']))]['runs']['hf'])}; paged / hf "
            f"{tiny['paged_over_hf_seconds']['median']:.1f}x, range {tiny['paged_over_hf_seconds']['min']:.1f}-"
            f"{tiny['paged_over_hf_seconds']['max']:.1f}).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sft-steps", type=int, default=20)
    parser.add_argument("--items", type=int, default=None, help="test items (default: the recipe's max_items)")
    parser.add_argument("--render", action="store_true", help="print the docs table from the committed JSON")
    parser.add_argument(
        "--default-recipe-only", action="store_true", help="only the default recipe's model part, added to the JSON"
    )
    args = parser.parse_args()
    committed = REPO / "artifacts" / "bench" / "engines_cpu.json"
    if args.render:
        print(render(read_json(committed)))
        return
    if args.default_recipe_only:  # the main part's date and machine stay; this part records its own
        result = read_json(committed)
        result["default_recipe_model"] = {
            "measured_at": now(),
            "load_average": machine_info()["load_average"],
            **default_recipe_calls(args.repeats),
        }
        committed.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(render(result))
        return

    import torch

    from posttrain.config import load_params

    params = load_params(RECIPE)
    torch.set_num_threads(params.compute.num_threads)
    started = time.perf_counter()
    params, frame, train = recipe_items(args.items or params.evaluate.max_items)
    model, tokenizer = load_base(params)
    models = {"base (recipe's pretrain)": compare("base", model, tokenizer, frame, params, args.repeats)}
    sft_seconds = None
    if args.sft_steps:
        sft_seconds = finetune(model, tokenizer, train, args.sft_steps, params.seed)
        model.eval()
        models[f"sft ({args.sft_steps} steps)"] = compare("sft", model, tokenizer, frame, params, args.repeats)
    result = {
        "recipe": RECIPE.relative_to(REPO).as_posix(),
        "torch_threads": params.compute.num_threads,
        "repeats": args.repeats,
        "sft_steps": args.sft_steps,
        "sft_seconds": None if sft_seconds is None else round(sft_seconds, 1),
        "models": models,
        "seconds": round(time.perf_counter() - started, 1),
    }
    result["default_recipe_model"] = {"measured_at": now(), **default_recipe_calls(args.repeats)}
    write_result("engines_cpu", result)
    print(render(result))


if __name__ == "__main__":
    main()
