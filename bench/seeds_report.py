"""Render artifacts/metrics/seeds.json (`posttrain seeds N`) as the README's multi-seed tables.

    python bench/seeds_report.py [--seeds artifacts/metrics/seeds.json]

Prints markdown: the quality ladder (held-out exact match per model x domain: mean ± std, the
per-seed range, and each seed's value with its 95% bootstrap CI), forgetting per stage, and the
default recipe's stage targets per seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _cell(entry: dict[str, Any] | None, with_seeds: bool) -> str:
    if not entry:
        return "–"
    std = f" ± {entry['std']:.3f}" if entry.get("std") is not None else ""
    text = f"{entry['mean']:.3f}{std} [{entry['min']:.3f}, {entry['max']:.3f}]"
    if with_seeds:
        seeds = entry.get("per_seed") or {}
        text += "<br>" + "; ".join(
            f"{v['mean']:.3f} ({v['ci_low']:.2f}–{v['ci_high']:.2f})" if isinstance(v, dict) else f"{v:.3f}"
            for v in seeds.values()
        )
    return text


def table(block: dict[str, dict[str, Any]], with_seeds: bool) -> str:
    domains = list(dict.fromkeys(d for per_domain in block.values() for d in per_domain))
    lines = ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for stage, per_domain in block.items():
        lines.append(f"| {stage} | " + " | ".join(_cell(per_domain.get(d), with_seeds) for d in domains) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=Path, default=ROOT / "artifacts" / "metrics" / "seeds.json")
    summary = json.loads(parser.parse_args().seeds.read_text())
    print(f"Seeds: {summary['seeds']}. Cell: mean ± std [min, max] over seeds; below it each seed's value (95% CI).\n")
    print("Held-out exact match:\n")
    print(table(summary["models"], with_seeds=True))
    if summary.get("forgetting"):
        print("\nForgetting (exact match of the model before the stage minus after; positive = lost):\n")
        print(table(summary["forgetting"], with_seeds=False))
    print("\nStage targets per seed:\n")
    names = list(dict.fromkeys(n for t in summary["targets"].values() for n in t))
    print("| seed | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for seed, targets in summary["targets"].items():
        cells = [
            ("pass" if t["passed"] else "FAIL" if t["passed"] is False else "n/a") + f": {t['detail']}"
            for t in (targets.get(n, {"passed": None, "detail": ""}) for n in names)
        ]
        print(f"| {seed} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
