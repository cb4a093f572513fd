"""Overhead: the same SFT run (a) as a bare TRL script, (b) as the `sft` stage through
`dvc repro --single-item sft` with MLflow tracking on, (c) through the Prefect flow
(`posttrain run --stages sft`) with no Prefect server configured (Prefect starts a temporary one
per flow run), (d) the same flow against a running `prefect server start` (PREFECT_API_URL, as for
scheduled deployments; the server's own start-up is not timed), side by side, repeated, at 1
and/or 2 torch threads.

Same model (the cpt output of the end-to-end run), same data (its sft mixture), same steps and
seed. Before each pipeline run the stage's output, its checkpoints and DVC's run cache are removed,
so DVC really runs the stage (instead of restoring it) and the stage does not resume.
Also gives the throughput comparison (tokens/s, peak RSS) of the stage against the bare script.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from bench.common import (
    PYTHON,
    SCRATCH,
    PrefectServer,
    clone_project,
    commit,
    dvc,
    full_root,
    log,
    median,
    read_json,
    reset_stage,
    run_bare,
    set_params,
    timed,
    write_result,
)  # fmt: skip

TARGET_RATIO = 1.10
PIPELINE_MODES = ("dvc", "flow", "flow_server")
TARGET_BARE_SECONDS = 60.0


def stage_figures(root: Path, wall: float) -> dict[str, Any]:
    m = read_json(root / "artifacts" / "metrics" / "sft.json")
    keys = (
        "final_train_loss",
        "first_train_loss",
        "steps",
        "tokens_seen",
        "tokens_per_second",
        "peak_rss_mb",
        "threads",
    )
    return {"wall_seconds": wall, "train_seconds": m["seconds"], **{k: m.get(k) for k in keys}}


def run_dvc(root: Path) -> dict[str, Any]:
    reset_stage(root, "sft")
    done = timed(dvc("repro", "--single-item", "sft"), root)
    if "Running stage 'sft'" not in done["stdout"]:
        raise RuntimeError(f"dvc did not run sft:\n{done['stdout'][-2000:]}")
    return stage_figures(root, done["seconds"])


def run_flow(root: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    reset_stage(root, "sft")
    done = timed([PYTHON, "-m", "posttrain.pipeline.cli", "run", "--stages", "sft"], root, env=env)
    if "sft: ran" not in done["stdout"]:
        raise RuntimeError(f"the flow did not run sft:\n{done['stdout'][-2000:]}\n{done['stderr'][-2000:]}")
    return stage_figures(root, done["seconds"])


def run_flow_with_server(root: Path) -> dict[str, Any]:
    """The flow against a running Prefect server; started before and stopped after, untimed."""
    with PrefectServer(SCRATCH / "prefect-server-home") as server:
        figures = run_flow(root, env=server.env(root))
    return {**figures, "server_startup_seconds": server.startup_seconds}


def prepare_copy(source: Path, threads: int, steps: int) -> Path:
    """A clone of the finished run where only sft is stale: sft.trainer.max_steps and compute.num_threads
    set; `dvc commit` records the new threads value for pretrain/cpt (it changes no numbers there),
    so the flow's upstream check finds them up to date."""
    root = clone_project(source, f"overhead-t{threads}")
    set_params(root, {"sft.trainer.max_steps": steps, "compute.num_threads": threads})
    timed(dvc("commit", "-f", "pretrain", "cpt"), root)
    commit(root, f"overhead: sft {steps} steps, {threads} threads")
    return root


def calibrate(root: Path, threads: int, probe_steps: int) -> tuple[int, dict[str, Any]]:
    """max_steps for a bare run of about TARGET_BARE_SECONDS, from a short bare run."""
    probe = run_bare(root, "sft", probe_steps, threads)
    fixed = probe["wall_seconds"] - probe["train_seconds"]
    rate = probe["steps"] / probe["train_seconds"]
    steps = max(probe_steps, int(round((TARGET_BARE_SECONDS - fixed) * rate / 10.0)) * 10)
    log(f"calibration ({threads} threads): {rate:.2f} steps/s, {fixed:.1f} s fixed -> max_steps {steps}")
    return steps, probe


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in PIPELINE_MODES:
        ratios = [r[mode]["wall_seconds"] / r["bare"]["wall_seconds"] for r in reps]
        added = [r[mode]["wall_seconds"] - r["bare"]["wall_seconds"] for r in reps]
        tps = [r[mode]["tokens_per_second"] / r["bare"]["tokens_per_second"] for r in reps]
        rss = [r[mode]["peak_rss_mb"] / r["bare"]["peak_rss_mb"] for r in reps]
        out[mode] = {
            "wall_ratio_median": round(median(ratios), 3),
            "wall_ratios": [round(x, 3) for x in ratios],
            "added_seconds_median": round(median(added), 2),
            "added_seconds": [round(x, 2) for x in added],
            "tokens_per_second_ratio_median": round(median(tps), 3),
            "peak_rss_ratio_median": round(median(rss), 3),
            "ratio_target_met": median(ratios) <= TARGET_RATIO,
            "throughput_target_met": median(tps) >= 0.9,
        }
    losses = {(r[m]["final_train_loss"]) for r in reps for m in ("bare", *PIPELINE_MODES)}
    out["final_losses"] = sorted(losses)
    out["identical_final_loss"] = len(losses) == 1
    out["bare_wall_seconds_median"] = round(median([r["bare"]["wall_seconds"] for r in reps]), 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", default="1,2", help="torch thread counts to measure, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="skip calibration and use this")
    parser.add_argument("--probe-steps", type=int, default=40)
    parser.add_argument("--source", type=Path, default=None, help="finished run to clone (default: the e2e run's)")
    args = parser.parse_args(argv)
    source = args.source or full_root()
    result: dict[str, Any] = {"source": str(source), "target_ratio": TARGET_RATIO, "by_threads": {}}
    for threads in [int(t) for t in args.threads.split(",")]:
        if args.max_steps:
            steps, probe = args.max_steps, None
        else:
            steps, probe = calibrate(source, threads, args.probe_steps)
        root = prepare_copy(source, threads, steps)
        # Prefect's first flow run on a fresh database is slower (migrations): one run first, so the
        # timed flow runs see the steady state. A no-change call would not start Prefect at all
        # (`posttrain run` answers from `dvc status`), hence --force on the cheap, deterministic prepare.
        warm = timed([PYTHON, "-m", "posttrain.pipeline.cli", "run", "--stages", "prepare", "--force"], root)
        reps = []
        for i in range(args.repeats):
            rep = {
                "bare": run_bare(root, "sft", steps, threads),
                "dvc": run_dvc(root),
                "flow": run_flow(root),
                "flow_server": run_flow_with_server(root),
            }
            log(
                f"  t={threads} rep {i + 1}: "
                + ", ".join(f"{m} {rep[m]['wall_seconds']:.1f} s" for m in ("bare", *PIPELINE_MODES))
                + "; losses "
                + " / ".join(f"{rep[m]['final_train_loss']:.6f}" for m in ("bare", *PIPELINE_MODES))
            )
            reps.append(rep)
        result["by_threads"][str(threads)] = {
            "max_steps": steps,
            "calibration": probe,
            "prefect_warmup_seconds": warm["seconds"],
            "repeats": reps,
            "summary": summarise(reps),
        }
        write_result("overhead", result)  # after each thread count: a partial result survives
    return result


if __name__ == "__main__":
    main()
