"""Adaptive data methods against their simple baselines, at equal budget, over seeds.

    python -m bench.adaptive_compare [--seeds 1 2 3] [--out artifacts/bench]

Runs the stage functions directly (stages.<name>.run) in scratch workspaces under
$BENCH_SCRATCH/adaptive, not `dvc exp run -S`: every DVC experiment copies the workspace and reruns the
stages upstream of the changed params (prepare, mix, pretrain, sft for the shared base), and each stage
process pays ~10-12 s of imports; on 2 shared cores that is minutes per run against the ~30 s the compared
stage takes. The switch itself is the same params key either way (see README: `dvc exp run -S`).

One shared base, built once: prepare (domains below), pretrain on every domain's text, then sft on
add/subb/rev. Then per seed (params.seed and the mixture seeds):

- curriculum: grpo on `subb` (1-3 digit differences: easy, learnable and hard buckets) from the base sft model,
  uniform order vs `grpo.curriculum: {method: ucb}`. Held-out (val) exact match at every checkpoint:
  steps to reach base + 0.05, area under the curve (mean over checkpoints), final test exact match.
- hybrid: on add3 from the base sft model, `grpo.hybrid` for N steps vs sft N/2 then grpo N/2 (equal
  optimizer steps and batch). Test exact match on add3 (trained), add4 (harder, never trained) and the
  change on add/subb/rev (forgetting).
- mixing: sft from the pretrained base at one step budget, static recipe weights vs stratified (equal
  weights) vs `mixtures.sft.adaptive: {method: aioli}` (probes inside the budget). Test loss and exact
  match averaged over the four domains.

Writes artifacts/bench/adaptive_compare.json (every run and the summaries); `python bench/report.py` renders
its table into docs/adaptive-methods.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO, RESULTS, SCRATCH, log, machine_info

# Students' t quantiles (two-sided 95%) by degrees of freedom, for the CIs of a few seeds.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

DOMAINS = {
    "add": {"kind": "addition", "digits": 2, "n_items": 3000},
    # Subtraction with 1-3 digit operands: easy, learnable and hard buckets in one domain (the curriculum's).
    "subb": {"kind": "subtraction", "digits": 1, "max_digits": 3, "n_items": 3000},
    "rev": {"kind": "reverse", "min_length": 3, "max_length": 6, "n_items": 3000},
    "add3": {"kind": "addition", "digits": 3, "n_items": 3000},
    "add4": {"kind": "addition", "digits": 4, "n_items": 600},
}
MIX_DOMAINS = ("add", "subb", "rev", "add3")
STATIC = {"add": 0.4, "subb": 0.25, "rev": 0.15, "add3": 0.2}  # the default recipe's sft weights (sub -> subb)
GRPO_STEPS = 120
MIX_STEPS = 300
EVAL_ITEMS = 200


def base_raw() -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tracking"]["enabled"] = False
    raw["data"]["domains"] = copy.deepcopy(DOMAINS)
    raw["model"]["tokenizer"]["domains"] = None  # every domain
    raw["promotion"]["compare_domain"] = "add3"
    every = {"add": 1, "subb": 1, "rev": 1, "add3": 1}
    raw["mixtures"] = {
        "pretrain": {"format": "text", "weights": every, "total": 8000},
        "cpt": {"format": "text", "weights": {"subb": 1}, "total": 200},
        "sft": {"format": "prompt_completion", "weights": {"add": 1, "subb": 1, "rev": 1}, "total": 6000},
        "dpo": {"format": "preference", "weights": {"add": 1}, "total": 200},
        "grpo": {"format": "prompt_answer", "weights": {"subb": 1}, "total": 1000},
    }
    raw["pretrain"]["trainer"].update(max_steps=800, save_steps=800)
    raw["pretrain"]["eval_every"] = 0
    raw["sft"]["trainer"].update(max_steps=1000, save_steps=1000)
    raw["sft"]["eval_every"] = 0
    raw["sft"]["schedule"] = {"name": "cosine", "warmup_fraction": 0.05}
    raw["grpo"]["trainer"].update(
        learning_rate=5e-5, max_steps=GRPO_STEPS, per_device_train_batch_size=32, save_steps=20, logging_steps=10
    )
    raw["grpo"]["eval_items"] = 64
    raw["grpo"]["num_generations"] = 8
    return raw


def params_of(raw: dict[str, Any]) -> Any:
    from posttrain.config import parse_params

    return parse_params(raw)


def workspace(name: str, base: Path, models: dict[str, str]) -> Any:
    """A fresh project root with the base's prepared data and the named base models in the given slots."""
    from posttrain.layout import Layout

    root = SCRATCH / "adaptive" / name
    shutil.rmtree(root, ignore_errors=True)
    layout = Layout(root)
    shutil.copytree(Layout(base).prepared, layout.prepared)
    for slot, source in models.items():
        shutil.copytree(Layout(base).model(source), layout.model(slot))
    return layout


def load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def scores(
    model: Any, tokenizer: Any, layout: Any, domain: str, split: str, items: int = EVAL_ITEMS
) -> dict[str, float]:
    """Greedy exact match and loss per token on the first `items` records of a split."""
    from posttrain import io
    from posttrain.data.domains import RECORD_COLUMNS
    from posttrain.data.verifiers import exact_match
    from posttrain.scoring.generation import generate
    from posttrain.scoring.loss import mean_token_loss

    records = io.read_parquet(layout.prepared_split(domain, split), RECORD_COLUMNS)[:items]
    completions = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=6)
    em = statistics.fmean(exact_match(c[0], r["answer"]) for c, r in zip(completions, records, strict=True))
    return {"exact_match": em, "loss": mean_token_loss(model, tokenizer, [r["text"] for r in records], 64)}


def build_base(seed_root: Path) -> Path:
    from posttrain.layout import Layout
    from stages import mix, prepare, pretrain, sft

    root = seed_root / "base"
    if (Layout(root).model("sft") / "lineage.json").is_file():
        log(f"base exists: {root}")
        return root
    shutil.rmtree(root, ignore_errors=True)
    layout = Layout(root)
    params = params_of(base_raw())
    started = time.perf_counter()
    prepare.run(params, layout)
    mix.run(params, layout)
    pretrain.run(params, layout)
    shutil.copytree(layout.model("pretrain"), layout.model("cpt"))  # sft's parent slot
    sft.run(params, layout)
    log(f"base built in {time.perf_counter() - started:.0f} s")
    return root


def with_seed(raw: dict[str, Any], seed: int) -> dict[str, Any]:
    raw["seed"] = seed
    for mixture in raw["mixtures"].values():
        mixture["seed"] = seed
    return raw


# --------------------------------------------------------------------------- the three comparisons


def curriculum_run(base: Path, seed: int, method: str) -> dict[str, Any]:
    from stages import grpo, mix

    raw = with_seed(base_raw(), seed)
    # Binary reward: a bucket the model always solves or never solves then gives zero advantage (with the
    # recipe's partial-credit digit_match, impossible items still have reward variance).
    raw["grpo"]["rewards"] = [{"name": "exact_match", "weight": 1.0}]
    if method == "ucb":
        raw["grpo"]["curriculum"] = {"method": "ucb", "arms": "difficulty"}
    params = params_of(raw)
    layout = workspace(f"curriculum-{method}-{seed}", base, {"dpo": "sft"})
    mix.run(params, layout)
    started = time.perf_counter()
    grpo.run(params, layout)
    seconds = time.perf_counter() - started
    model, tokenizer = load(layout.model("dpo"))
    curve = [{"step": 0, **scores(model, tokenizer, layout, "subb", "val")}]
    for ckpt in sorted(layout.root.glob("checkpoints/grpo-*/checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        model, tokenizer = load(ckpt)
        curve.append({"step": int(ckpt.name.split("-")[1]), **scores(model, tokenizer, layout, "subb", "val")})
    model, tokenizer = load(layout.model("grpo"))
    from posttrain.io import read_json

    metrics = read_json(layout.metrics("grpo"))
    return {
        "seconds": round(seconds, 1),
        "curve": curve,
        "test": scores(model, tokenizer, layout, "subb", "test"),
        "final_probabilities": metrics.get("curriculum_final_probabilities"),
    }


def hybrid_run(base: Path, seed: int, method: str) -> dict[str, Any]:
    from stages import grpo, mix, sft

    raw = with_seed(base_raw(), seed)
    raw["mixtures"]["grpo"]["weights"] = {"add3": 1}
    raw["mixtures"]["sft"]["weights"] = {"add3": 1}
    batch = raw["grpo"]["trainer"]["per_device_train_batch_size"]
    started = time.perf_counter()
    if method == "hybrid":
        raw["grpo"]["hybrid"] = {"threshold": 0.0}
        params = params_of(raw)
        layout = workspace(f"hybrid-{method}-{seed}", base, {"dpo": "sft"})
        mix.run(params, layout)
        grpo.run(params, layout)
    else:  # sft for half the steps, then grpo for the other half, same batch
        raw["sft"]["trainer"].update(
            max_steps=GRPO_STEPS // 2,
            per_device_train_batch_size=batch,
            learning_rate=raw["grpo"]["trainer"]["learning_rate"],
        )
        raw["grpo"]["trainer"]["max_steps"] = GRPO_STEPS // 2
        params = params_of(raw)
        layout = workspace(f"hybrid-{method}-{seed}", base, {"cpt": "sft"})
        mix.run(params, layout)
        sft.run(params, layout)
        shutil.copytree(layout.model("sft"), layout.model("dpo"))
        grpo.run(params, layout)
    seconds = time.perf_counter() - started
    model, tokenizer = load(layout.model("grpo"))
    return {
        "seconds": round(seconds, 1),
        "test": {d: scores(model, tokenizer, layout, d, "test") for d in ("add3", "add4", "add", "subb", "rev")},
    }


def mixing_run(base: Path, seed: int, method: str) -> dict[str, Any]:
    from stages import mix, sft

    raw = with_seed(base_raw(), seed)
    weights = STATIC if method != "stratified" else dict.fromkeys(MIX_DOMAINS, 0.25)
    raw["mixtures"]["sft"].update(weights=weights, total=6000)
    if method == "aioli":
        raw["mixtures"]["sft"]["adaptive"] = {"method": "aioli", "rounds": 4, "probe_steps": 2, "eval_items": 64}
    raw["sft"]["trainer"].update(max_steps=MIX_STEPS, per_device_train_batch_size=32, save_steps=MIX_STEPS)
    params = params_of(raw)
    layout = workspace(f"mixing-{method}-{seed}", base, {"cpt": "pretrain"})
    mix.run(params, layout)
    started = time.perf_counter()
    sft.run(params, layout)
    seconds = time.perf_counter() - started
    model, tokenizer = load(layout.model("sft"))
    from posttrain.io import read_json

    metrics = read_json(layout.metrics("sft"))
    per_domain = {d: scores(model, tokenizer, layout, d, "test") for d in MIX_DOMAINS}
    return {
        "seconds": round(seconds, 1),
        "test": per_domain,
        "mean_loss": statistics.fmean(v["loss"] for v in per_domain.values()),
        "mean_exact_match": statistics.fmean(v["exact_match"] for v in per_domain.values()),
        "final_proportions": metrics.get("mixing_final_proportions"),
        "tokens_seen": metrics.get("tokens_seen"),
    }


# --------------------------------------------------------------------------- statistics and report


def summary(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    half = T95.get(n - 1, 1.96) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "ci95": [mean - half, mean + half]}


def fmt(s: dict[str, float], digits: int = 3) -> str:
    lo, hi = s["ci95"]
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}] CI [{lo:.{digits}f}, {hi:.{digits}f}]"


def curriculum_figures(run: dict[str, Any], threshold: float) -> dict[str, float]:
    curve = run["curve"]
    # Not reached within the run: one logging interval past the end (the table says "not reached").
    reached = next((p["step"] for p in curve if p["exact_match"] >= threshold), GRPO_STEPS + 20)
    return {
        "steps_to_threshold": reached,
        "auc": statistics.fmean(p["exact_match"] for p in curve),
        "final_test_em": run["test"]["exact_match"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--only", nargs="*", default=["curriculum", "hybrid", "mixing"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="re-render the table from the JSON written before")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads((args.out / "adaptive_compare.json").read_text())
        print(report(results, results["base_val_exact_match"])["markdown"])
        return
    from posttrain.io import write_json_atomic
    from posttrain.runtime import setup_runtime

    setup_runtime(params_of(base_raw()).compute, 0)  # threads as the recipe sets them (1)
    args.out.mkdir(parents=True, exist_ok=True)
    base = build_base(SCRATCH / "adaptive")
    out = args.out / "adaptive_compare.json"
    results: dict[str, Any] = {"machine": machine_info(), "seeds": args.seeds, "runs": {}}
    if out.is_file():  # keep the comparisons not rerun now (same seeds only)
        earlier = json.loads(out.read_text())
        if earlier.get("seeds") == args.seeds:
            results["runs"] = {k: v for k, v in earlier.get("runs", {}).items() if k not in args.only}
    model, tokenizer = load(Path(base) / "artifacts/models/sft")
    from posttrain.layout import Layout

    base_layout = Layout(base)
    results["base"] = {
        d: scores(model, tokenizer, base_layout, d, "test") for d in ("subb", "add3", "add4", "add", "rev")
    }
    base_val = scores(model, tokenizer, base_layout, "subb", "val")["exact_match"]
    results["base_val_exact_match"] = base_val
    plan = {
        "curriculum": (curriculum_run, ("uniform", "ucb")),
        "hybrid": (hybrid_run, ("sft_then_grpo", "hybrid")),
        "mixing": (mixing_run, ("static", "stratified", "aioli")),
    }
    for name in args.only:
        run_fn, methods = plan[name]
        results["runs"][name] = {}
        for method in methods:
            for seed in args.seeds:
                log(f"{name} {method} seed {seed}")
                results["runs"].setdefault(name, {}).setdefault(method, []).append(run_fn(base, seed, method))
                write_json_atomic(out, results)
    table = report(results, base_val)
    results["summary"] = table["summary"]
    write_json_atomic(out, results)
    log(f"wrote {out}; `python bench/report.py` renders its table into docs/adaptive-methods.md")


def report(results: dict[str, Any], base_val: float) -> dict[str, Any]:
    runs, summ, lines = results["runs"], {}, []
    n = len(results["seeds"])
    lines.append(
        f"CPU: {results['machine'].get('cpu_model')}; seeds {results['seeds']} (mean ± std [min, max] CI95, t, n={n})"
    )
    if "curriculum" in runs:
        threshold = base_val + 0.05
        lines += ["", f"Curriculum (grpo on subb, {GRPO_STEPS} steps; threshold = base val EM {base_val:.3f} + 0.05)", "",
                  "| method | steps to threshold | AUC held-out EM | final test EM |", "|---|---|---|---|"]  # fmt: skip
        for method, items in runs["curriculum"].items():
            figures = [curriculum_figures(r, threshold) for r in items]
            s = {k: summary([f[k] for f in figures]) for k in figures[0]}
            summ[f"curriculum/{method}"] = s
            hits = [f["steps_to_threshold"] for f in figures if f["steps_to_threshold"] <= GRPO_STEPS]
            steps = f"{len(hits)}/{len(figures)} seeds reached" + (
                f" (mean {statistics.fmean(hits):.0f})" if hits else ""
            )
            lines.append(f"| {method} | {steps} | {fmt(s['auc'])} | {fmt(s['final_test_em'])} |")
    if "hybrid" in runs:
        base = results["base"]
        lines += ["", f"Hybrid vs SFT→GRPO (add3, {GRPO_STEPS} steps in all; forgetting = after − base EM)", "",
                  "| method | add3 EM | add4 EM (harder) | Δ add | Δ subb | Δ rev |", "|---|---|---|---|---|---|"]  # fmt: skip
        for method, items in runs["hybrid"].items():
            s = {d: summary([r["test"][d]["exact_match"] for r in items]) for d in ("add3", "add4")}
            for d in ("add", "subb", "rev"):
                s[f"delta_{d}"] = summary([r["test"][d]["exact_match"] - base[d]["exact_match"] for r in items])
            summ[f"hybrid/{method}"] = s
            cells = [fmt(s["add3"]), fmt(s["add4"])] + [fmt(s[f"delta_{d}"]) for d in ("add", "subb", "rev")]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "mixing" in runs:
        lines += ["", f"Online mixing (sft from the pretrained base, {MIX_STEPS} steps x 32 rows, probes included)", "",
                  "| method | mean test loss | mean test EM |", "|---|---|---|"]  # fmt: skip
        for method, items in runs["mixing"].items():
            s = {k: summary([r[k] for r in items]) for k in ("mean_loss", "mean_exact_match")}
            summ[f"mixing/{method}"] = s
            lines.append(f"| {method} | {fmt(s['mean_loss'])} | {fmt(s['mean_exact_match'])} |")
    return {"summary": summ, "markdown": "\n".join(lines) + "\n"}


if __name__ == "__main__":
    main()
