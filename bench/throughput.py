"""Throughput and memory per trainer stage: tokens per second and peak resident memory of each stage
(pretrain, cpt, sft, dpo, grpo) against the bare TRL run of the same configuration (bench/bare_trl.py),
target ratio stage / bare >= 0.95 for tokens per second. On CUDA both sides also report peak GPU memory
(torch.cuda.max_memory_allocated).

In a clone of the finished end-to-end run, for each stage with a reduced step count, `--repeats` times,
alternating: (a) the bare script, (b) the stage through `dvc repro --single-item <stage>` after a reset
(its dvc.lock entry, output folder, checkpoints and DVC's run cache removed, so DVC really runs it and
it does not resume). Same input model, data, steps, seed and torch threads on both sides, so the final
train losses must be identical. The stage's tokens/s is over training alone (trainer.train() minus
the continual evaluation inside it), the bare one over trainer.train(); both count tokens the way TRL
does for that trainer (state.num_input_tokens_seen, non-padding). Peak RSS is each process's
ru_maxrss (the stage's process imports the pipeline, MLflow and the continual-evaluation sets too).

Stages are run in reverse pipeline order (grpo first): a stage run rewrites its model folder, which is
the input of the next stage, so each stage is measured on the finished run's input model.

    python bench/throughput.py [--source ROOT] [--stages cpt,sft,dpo,grpo,pretrain] [--repeats 2]
        [--steps sft=250,grpo=150] [--threads 1] [--name throughput]

The real-model recipe (configs/smollm2-135m.yaml), from a finished run of it in ROOT:

    python bench/throughput.py --source ROOT --stages sft,dpo,grpo --steps sft=10,dpo=10,grpo=8 \
        --threads 2 --name throughput-smollm2
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from bench.common import (
    STAGE_ORDER,
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

TARGET_RATIO = 0.95
TRAINER_STAGES = ("pretrain", "cpt", "sft", "dpo", "grpo")
# Steps for roughly 20-40 s of training per run with 1 thread on a 2-core machine (default recipe).
DEFAULT_STEPS = {"pretrain": 250, "cpt": 250, "sft": 250, "dpo": 200, "grpo": 150}
STAGE_KEYS = ("tokens_per_second", "steps_per_second", "peak_rss_mb", "peak_gpu_mb", "final_train_loss", "steps",
              "tokens_seen", "threads", "device")  # fmt: skip


def run_stage(root: Path, stage: str) -> dict[str, Any]:
    reset_stage(root, stage)
    done = timed(dvc("repro", "--single-item", stage), root)
    if f"Running stage '{stage}'" not in done["stdout"]:
        raise RuntimeError(f"dvc did not run {stage}:\n{done['stdout'][-2000:]}")
    m = read_json(root / "artifacts" / "metrics" / f"{stage}.json")
    for folder in (root / "checkpoints").glob(f"{stage}-*"):  # GBs for a real model; never resumed here
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "wall_seconds": done["seconds"],
        "train_seconds": m["seconds"],  # trainer.train(), continual evaluation included
        "eval_seconds": m.get("eval_seconds", 0.0),  # excluded from the stage's rates
        **{k: m.get(k) for k in STAGE_KEYS},
    }


def prepare_copy(source: Path, steps: dict[str, int], threads: int) -> Path:
    """A clone of the finished run with <stage>.trainer.max_steps and compute.num_threads set; `dvc commit`
    records the new params for the trainer stages (each measured stage drops its entry before it runs)."""
    root = clone_project(source, "throughput")
    updates: dict[str, Any] = {f"{stage}.trainer.max_steps": n for stage, n in steps.items()}
    set_params(root, {**updates, "compute.num_threads": threads})
    import yaml

    locked = yaml.safe_load((root / "dvc.lock").read_text()).get("stages", {})
    trainers = [s for s in TRAINER_STAGES if s in locked]
    if trainers:
        timed(dvc("commit", "-f", *trainers), root)
    commit(root, f"throughput: {', '.join(f'{s} {n} steps' for s, n in steps.items())}, {threads} threads")
    return root


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    tps = [r["stage"]["tokens_per_second"] / r["bare"]["tokens_per_second"] for r in reps]
    rss = [r["stage"]["peak_rss_mb"] / r["bare"]["peak_rss_mb"] for r in reps]
    losses = sorted({r[side]["final_train_loss"] for r in reps for side in ("bare", "stage")})
    tps_median = round(median(tps), 3)  # the target is judged on the figure reported
    return {
        "tokens_per_second_ratio_median": tps_median,
        "tokens_per_second_ratios": [round(x, 3) for x in tps],
        "peak_rss_ratio_median": round(median(rss), 3),
        "peak_rss_ratios": [round(x, 3) for x in rss],
        "throughput_target_met": tps_median >= TARGET_RATIO,
        "identical_final_loss": len(losses) == 1,
        "final_losses": losses,
    }


def parse_steps(text: str | None) -> dict[str, int]:
    """`sft=300,grpo=60` -> {"sft": 300, "grpo": 60}."""
    out: dict[str, int] = {}
    for item in filter(None, (text or "").split(",")):
        stage, _, n = item.partition("=")
        if stage.strip() not in TRAINER_STAGES or not n.strip().isdigit() or int(n) < 1:
            raise SystemExit(f"--steps: got {item!r}; expected stage=N with a stage of {TRAINER_STAGES} and N >= 1")
        out[stage.strip()] = int(n)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=None, help="finished run to clone (default: the e2e run's)")
    parser.add_argument("--stages", default=",".join(TRAINER_STAGES), help="trainer stages, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", default=None, help="max_steps overrides, e.g. sft=300,grpo=60")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--name", default="throughput", help="result file artifacts/bench/<name>.json")
    args = parser.parse_args(argv)
    source = (args.source or full_root()).resolve()
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in TRAINER_STAGES]
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; expected some of {TRAINER_STAGES}")
    import yaml

    source_params = yaml.safe_load((source / "params.yaml").read_text())
    if "pretrain" in wanted and source_params.get("model", {}).get("base", "scratch") != "scratch":
        log("pretrain skipped: model.base is not 'scratch', so the stage trains nothing")
        wanted.remove("pretrain")
    steps = {
        **{s: DEFAULT_STEPS[s] for s in wanted},
        **{s: n for s, n in parse_steps(args.steps).items() if s in wanted},
    }

    root = prepare_copy(source, steps, args.threads)
    result: dict[str, Any] = {"source": str(source), "repeats": args.repeats, "target_ratio": TARGET_RATIO,
                              "threads": args.threads, "stages": {}}  # fmt: skip
    done: dict[str, Any] = {}
    # Reverse pipeline order: rerunning a stage rewrites the input of the next one.
    for stage in sorted(wanted, key=STAGE_ORDER.index, reverse=True):
        reps = []
        for i in range(args.repeats):
            rep = {"bare": run_bare(root, stage, steps[stage], args.threads), "stage": run_stage(root, stage)}
            b, s = rep["bare"], rep["stage"]
            log(
                f"{stage} rep {i + 1}: tokens/s bare {b['tokens_per_second']:.0f} stage {s['tokens_per_second']:.0f}"
                f" (x{s['tokens_per_second'] / b['tokens_per_second']:.3f}); peak RSS {b['peak_rss_mb']:.0f} /"
                f" {s['peak_rss_mb']:.0f} MB; final loss {b['final_train_loss']!r} / {s['final_train_loss']!r}"
            )
            reps.append(rep)
        done[stage] = {"max_steps": steps[stage], "repeats": reps, "summary": summarise(reps)}
        result["stages"] = {s: done[s] for s in STAGE_ORDER if s in done}
        write_result(args.name, result)  # after each stage: a partial result survives
    return result


if __name__ == "__main__":
    main()
