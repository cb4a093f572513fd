"""Does merging sibling fine-tunes help? Two SFT variants of one parent, trained for different skills,
merged by several methods, scored on held-out test items, over seeds.

Setup (the default recipe's data and its `cpt` model as the shared parent, `--parent`):
  - `sft@arith`: SFT on add + add3; `sft@text`: SFT on rev + sub; same steps, same seed per run
    (the stage code of the pipeline: `stages.sft.run(..., stage="sft@<name>")`, tracking off);
  - merges of the two over the parent: linear (0.5/0.5), task arithmetic at the lambda chosen on the
    VALIDATION split from a grid, TIES (density 0.5), AdaMerging task-wise and layer-wise (entropy on
    validation prompts);
  - exact match on the first `--items` TEST items per domain (the evaluate stage's scoring).

The merge criterion, per seed: the merge is within 2 points of the better parent on every domain and
above each parent on the mean over domains. Writes artifacts/bench/merge_compare.json and prints a
Markdown table (README). Runs in a scratch workspace (`$BENCH_SCRATCH`/merge_compare_<setup>).

    python bench/merge_compare.py --setup disjoint --seeds 0 1 2 --steps 120
    python bench/merge_compare.py --setup emphasis --seeds 0 1 2 --steps 120
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench.common import REPO, SCRATCH, log, write_result
from posttrain.config import parse_params
from posttrain.layout import Layout

# Two ways to split the skills between the siblings: each on its own domains only (`disjoint`), or
# each on every domain with its own skills weighted up (`emphasis`: 35/35 vs 15/15).
SETUPS = {
    "disjoint": {"arith": {"add": 0.5, "add3": 0.5}, "text": {"rev": 0.5, "sub": 0.5}},
    "emphasis": {
        "arith": {"add": 0.35, "add3": 0.35, "rev": 0.15, "sub": 0.15},
        "text": {"add": 0.15, "add3": 0.15, "rev": 0.35, "sub": 0.35},
    },
}
VARIANTS = SETUPS["disjoint"]
DOMAINS = ("add", "add3", "rev", "sub")
TA_GRID = (0.25, 0.5, 0.75, 1.0)
MARGIN = 0.02  # "within 2 points of the better parent"


def bench_params(seed: int, steps: int) -> Any:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tracking"]["enabled"] = False
    raw["compute"]["num_threads"] = 1
    raw["variants"] = {
        "sft": {
            name: {"seed": seed, "trainer": {"max_steps": steps, "save_steps": steps}, "eval_every": 0}
            for name in VARIANTS
        }
    }
    for name, weights in VARIANTS.items():
        raw["mixtures"][f"sft@{name}"] = {**raw["mixtures"]["sft"], "weights": weights, "total": 3000}
    return parse_params(raw)


def prepare_workspace(root: Path, parent: Path) -> Layout:
    """Scratch workspace: the repo's prepared data and the parent model as `cpt` (lineage hashes kept)."""
    layout = Layout(root)
    if root.exists():
        shutil.rmtree(root / "artifacts", ignore_errors=True)
    shutil.copytree(REPO / "artifacts" / "data" / "prepared", layout.prepared)
    shutil.copytree(parent, layout.model("cpt"))
    return layout


def load_items(layout: Layout, split: str, n: int) -> dict[str, Any]:
    import pandas as pd

    return {d: pd.read_parquet(layout.prepared_split(d, split)).head(n).reset_index(drop=True) for d in DOMAINS}


def score(model_dir: Path, items: dict[str, Any]) -> dict[str, float]:
    """Exact match per domain (the evaluate stage's scoring: greedy, verifiers) and their mean."""
    from posttrain.data.verifiers import VERIFIERS
    from posttrain.models.loading import load_stage_model
    from posttrain.scoring.evaluation import EvalSettings, ModelAnswerer, evaluate_domain

    loaded = load_stage_model(model_dir)
    answerer = ModelAnswerer(loaded.model.eval(), loaded.tokenizer, max_new_tokens=6, batch_size=256)
    settings = EvalSettings(bootstrap_samples=200, pass_k=())
    out = {
        d: evaluate_domain(answerer, frame, VERIFIERS, settings)[0]["exact_match"]["mean"] for d, frame in items.items()
    }
    out["mean"] = sum(out[d] for d in DOMAINS) / len(DOMAINS)
    return out


def merges(layout: Layout, work: Path, params: Any, val: dict[str, Any]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each merge method's model folder and what it learned or chose."""
    from posttrain.models.adamerging import adamerge
    from posttrain.models.merging import merge_models

    inputs = [layout.model(f"sft@{name}") for name in VARIANTS]
    base = layout.model("cpt")
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    merge_models(inputs, work / "linear", method="linear", weights=[0.5, 0.5])
    out["linear"] = (work / "linear", {})
    grid = {}
    for lam in TA_GRID:
        folder = work / f"ta_{lam}"
        merge_models(inputs, folder, method="task_arithmetic", weights=[lam, lam], base_dir=base)
        grid[lam] = score(folder, val)["mean"]
    best = max(grid, key=lambda lam: grid[lam])
    out["task_arithmetic"] = (work / f"ta_{best}", {"lambda": best, "val_mean_by_lambda": grid})
    merge_models(inputs, work / "ties", method="ties", weights=[1.0, 1.0], base_dir=base, density=0.5)
    out["ties"] = (work / "ties", {"density": 0.5})
    prompts = [p for frame in val.values() for p in frame["prompt"].tolist()[:64]]
    for granularity in ("task", "layer"):
        folder = work / f"ada_{granularity}"
        ada = params.merge.adamerging
        stats = adamerge(
            inputs, base, folder, prompts, granularity=granularity, steps=ada.steps, lr=ada.lr, init=ada.init
        )
        kept = {k: stats[k] for k in ("mean_coefficient_per_model", "entropy_before", "entropy_after", "seconds")}
        out[f"adamerging_{granularity}"] = (folder, kept)
    return out


def verdict(scores: dict[str, dict[str, float]], method: str) -> dict[str, Any]:
    """The merge criterion for one merge in one seed: per-domain gap to the better parent, mean vs each parent."""
    parents = [f"sft@{name}" for name in VARIANTS]
    gaps = {d: scores[method][d] - max(scores[p][d] for p in parents) for d in DOMAINS}
    above = {p: scores[method]["mean"] - scores[p]["mean"] for p in parents}
    return {
        "gap_to_better_parent": gaps,
        "within_2_points_everywhere": all(g >= -MARGIN for g in gaps.values()),
        "mean_minus_parent": above,
        "above_each_parent_on_mean": all(v > 0 for v in above.values()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="SFT steps per variant")
    parser.add_argument("--items", type=int, default=200, help="test items per domain")
    parser.add_argument("--val-items", type=int, default=100, help="validation items per domain (lambda grid)")
    parser.add_argument("--parent", type=Path, default=REPO / "artifacts" / "models" / "cpt")
    parser.add_argument("--setup", choices=sorted(SETUPS), default="disjoint", help="how the skills are split")
    args = parser.parse_args(argv)
    VARIANTS.clear()
    VARIANTS.update(SETUPS[args.setup])
    from posttrain.lineage import read_lineage
    from stages import mix, sft

    root = SCRATCH / f"merge_compare_{args.setup}"
    layout = prepare_workspace(root, args.parent)
    test, val = load_items(layout, "test", args.items), load_items(layout, "val", args.val_items)
    mix.run(bench_params(args.seeds[0], args.steps), layout)  # mixtures do not depend on the run seed
    runs: dict[int, Any] = {}
    parent_scores = score(layout.model("cpt"), test)
    for seed in args.seeds:
        params = bench_params(seed, args.steps)
        scores: dict[str, dict[str, float]] = {"cpt": parent_scores}
        seconds = {}
        for name in VARIANTS:
            started = time.perf_counter()
            sft.run(params, layout, stage=f"sft@{name}")
            seconds[f"sft@{name}"] = round(time.perf_counter() - started, 1)
            scores[f"sft@{name}"] = score(layout.model(f"sft@{name}"), test)
            log(f"seed {seed} sft@{name}: {scores[f'sft@{name}']} in {seconds[f'sft@{name}']} s")
        work = root / "merges" / str(seed)
        shutil.rmtree(work, ignore_errors=True)
        details = {}
        for method, (folder, info) in merges(layout, work, params, val).items():
            scores[method] = score(folder, test)
            details[method] = info
            log(f"seed {seed} {method}: {scores[method]} {info}")
        methods = list(details)
        runs[seed] = {
            "scores": scores,
            "details": details,
            "train_seconds": seconds,
            "verdict": {m: verdict(scores, m) for m in methods},
        }
    models = list(runs[args.seeds[0]]["scores"])
    summary = {
        m: {
            key: {
                "mean": statistics.mean(runs[s]["scores"][m][key] for s in args.seeds),
                "std": statistics.stdev(runs[s]["scores"][m][key] for s in args.seeds) if len(args.seeds) > 1 else 0.0,
            }
            for key in (*DOMAINS, "mean")
        }
        for m in models
    }
    result = {
        "setup": {
            "parent": str(args.parent),
            "parent_content_hash": (read_lineage(args.parent) or {}).get("content_hash"),
            "setup": args.setup,
            "variants": VARIANTS,
            "steps": args.steps,
            "test_items_per_domain": args.items,
            "val_items_per_domain": args.val_items,
            "seeds": args.seeds,
        },
        "runs": {str(s): r for s, r in runs.items()},
        "summary": summary,
        "criterion_met": {
            m: [
                runs[s]["verdict"][m]["within_2_points_everywhere"]
                and runs[s]["verdict"][m]["above_each_parent_on_mean"]
                for s in args.seeds
            ]
            for m in runs[args.seeds[0]]["verdict"]
        },
    }
    write_result(f"merge_compare_{args.setup}", result)
    print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown: exact match mean ± std over seeds per model and domain, and the criterion per seed."""
    lines = [
        "| model | " + " | ".join(DOMAINS) + " | mean | criterion met (per seed) |",
        "|---|" + "---|" * (len(DOMAINS) + 2),
    ]
    for model, per in result["summary"].items():
        cells = [f"{per[k]['mean']:.3f} ± {per[k]['std']:.3f}" for k in (*DOMAINS, "mean")]
        met = result["criterion_met"].get(model)
        lines.append(
            f"| {model} | " + " | ".join(cells) + f" | {' '.join('yes' if x else 'no' for x in met) if met else '-'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
