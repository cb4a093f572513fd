"""The CPU benchmark suite in one command: JSON under artifacts/bench/, then the README table.

    python bench/run.py --all                      # everything, set-up timing included (about an hour)
    python bench/run.py --only overhead,cache      # parts; later parts reuse the end-to-end run's copy
    python bench/run.py --all --recipe configs/tiny.yaml --results /tmp/r --no-readme --no-setup  # smoke

Parts, in run order: e2e (default recipe from a clean copy; the copy is reused by the others),
quality (ladder + CPT ablations), throughput (each trainer stage against a bare TRL script), cache,
overhead (bare TRL vs dvc vs Prefect flow), startup (imports, CLI), gpu (the GPU check's --cpu-smoke run,
bench/gpu_check.py: its code path at toy size; the GPU run itself is bench/gpu_check.sh on a GPU), report (README table). Pipeline runs happen in scratch copies under
$BENCH_SCRATCH (default /tmp/posttrain-bench), never in this checkout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("e2e", "quality", "throughput", "cache", "overhead", "startup", "gpu", "report")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="run every part")
    parser.add_argument("--only", default=None, help=f"comma-separated parts: {','.join(PARTS)}")
    parser.add_argument(
        "--recipe", type=Path, default=None, help="params file for the end-to-end run (default params.yaml)"
    )
    parser.add_argument("--results", type=Path, default=None, help="JSON folder (default artifacts/bench)")
    parser.add_argument("--overhead-threads", default="1,2", help="torch threads for the overhead comparison")
    parser.add_argument("--overhead-repeats", type=int, default=2)
    parser.add_argument(
        "--overhead-steps", type=int, default=None, help="fixed sft max_steps (default: calibrated to ~60 s)"
    )
    parser.add_argument(
        "--setup",
        action="store_true",
        help="e2e: also time scripts/setup.sh with a fresh venv (on by default with --all)",
    )
    parser.add_argument("--no-setup", action="store_true", help="with --all: skip timing the set-up")
    parser.add_argument("--no-readme", action="store_true", help="report: check the tables instead of rewriting them")
    args = parser.parse_args(argv)
    if args.results:
        os.environ["BENCH_RESULTS"] = str(args.results.resolve())
    parts = PARTS if args.all else tuple(p.strip() for p in (args.only or "").split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if not parts or unknown:
        parser.error(f"choose --all or --only from {', '.join(PARTS)} (unknown: {unknown})")

    # Imported after BENCH_RESULTS is set (bench.common reads it).
    from bench import cache, e2e, gpu_check, overhead, quality, report, startup, throughput
    from bench.common import RESULTS, log

    if args.all:
        # One run's figures only: results of an earlier, partial or interrupted run must not mix in.
        for stale in sorted(RESULTS.glob("*.json")):
            log(f"removing earlier result {stale}")
            stale.unlink()

    for part in PARTS:
        if part not in parts:
            continue
        if part == "e2e":
            setup = (args.setup or args.all) and not args.no_setup
            e2e.main([*(["--params", str(args.recipe)] if args.recipe else []), *(["--setup"] if setup else [])])
        elif part == "quality":
            quality.main([])
        elif part == "throughput":
            throughput.main([])
        elif part == "cache":
            cache.main([])
        elif part == "overhead":
            extra = ["--max-steps", str(args.overhead_steps)] if args.overhead_steps else []
            overhead.main(["--threads", args.overhead_threads, "--repeats", str(args.overhead_repeats), *extra])
        elif part == "startup":
            startup.main([])
        elif part == "gpu":
            gpu_check.main(["--cpu-smoke"])
        elif part == "report":
            report.main(["--check"] if args.no_readme else [])


if __name__ == "__main__":
    main()
