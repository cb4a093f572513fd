"""Checkpoint averaging in place of LR decay, at equal steps, over seeds.

The `sft@arith` variant of bench/merge_compare.py (emphasis split) trained from the default recipe's
`cpt` model twice per seed: with the recipe's WSD schedule (hold, then decay over the last 30%), and
at a constant LR with `average_last: 3` (checkpoints every `steps / 3` steps, their mean is the
model). Exact match on the first `--items` TEST items per domain. Writes artifacts/bench/ckpt_average.json.

    python bench/ckpt_average.py --seeds 0 1 2 --steps 120
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, SCRATCH, log, write_result
from bench.merge_compare import DOMAINS, SETUPS, VARIANTS, bench_params, load_items, prepare_workspace, score
from posttrain.config import parse_params


def averaged_params(params: Any, steps: int, k: int) -> Any:
    raw = params.model_dump(mode="json")
    raw["variants"]["sft"]["arith"].update(
        {"trainer": {"max_steps": steps, "save_steps": steps // k}, "schedule": {"name": "constant"}, "average_last": k}
    )
    return parse_params(raw)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--last-k", type=int, default=3)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--parent", type=Path, default=REPO / "artifacts" / "models" / "cpt")
    args = parser.parse_args(argv)
    from stages import mix, sft

    VARIANTS.clear()
    VARIANTS.update(SETUPS["emphasis"])
    layout = prepare_workspace(SCRATCH / "ckpt_average", args.parent)
    test = load_items(layout, "test", args.items)
    mix.run(bench_params(args.seeds[0], args.steps), layout)
    scores: dict[str, dict[str, dict[str, float]]] = {"wsd": {}, "constant_avg": {}}
    for seed in args.seeds:
        wsd = bench_params(seed, args.steps)
        for name, params in (("wsd", wsd), ("constant_avg", averaged_params(wsd, args.steps, args.last_k))):
            sft.run(params, layout, stage="sft@arith")
            scores[name][str(seed)] = score(layout.model("sft@arith"), test)
            log(f"seed {seed} {name}: {scores[name][str(seed)]}")
    summary = {
        name: {
            key: {
                "mean": statistics.mean(per[str(s)][key] for s in args.seeds),
                "std": statistics.stdev(per[str(s)][key] for s in args.seeds) if len(args.seeds) > 1 else 0.0,
            }
            for key in (*DOMAINS, "mean")
        }
        for name, per in scores.items()
    }
    result = {
        "setup": {"variant": "sft@arith (emphasis)", "steps": args.steps, "last_k": args.last_k, "seeds": args.seeds},
        "scores": scores,
        "summary": summary,
    }
    write_result("ckpt_average", result)
    for name, per in summary.items():
        print(
            f"| {name} | "
            + " | ".join(f"{per[k]['mean']:.3f} ± {per[k]['std']:.3f}" for k in (*DOMAINS, "mean"))
            + " |"
        )
    return result


if __name__ == "__main__":
    main()
