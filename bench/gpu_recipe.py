"""A recipe end to end without DVC, then each trainer stage against a bare TRL script, side by side.

For a machine that has torch and the project's Python dependencies but not its orchestration tools
(e.g. a lent GPU machine; docs/scale-out.md, "What was run where"): every stage of dvc.yaml runs in
DAG order as its own process, with the command dvc.yaml gives it (`python -m stages.<name>`), so the
code and the numbers are the pipeline's; what DVC would add (caching, dvc.lock) is left out. Then, for each trainer stage, the
bare TRL script (bench/bare_trl.py: same model, data, settings and seed) and the stage itself
(`python -m stages.<stage>` after removing its output and checkpoints) alternate, with the same
step count, and the ratio of their tokens per second is the figure (target >= 0.95), with peak
resident and GPU memory.

    python bench/gpu_recipe.py --params configs/smollm2-135m.yaml --set compute.device=cuda \\
        --set compute.precision=auto --steps sft=100,dpo=40,grpo=16 --repeats 1 --out DIR

It writes params.yaml in --root (default: this checkout; use a scratch copy), the stages' outputs
under its artifacts/, and DIR/gpu_recipe.json (updated after each part) with DIR/<stage>.log.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PYTHON, REPO, log, machine_info, now, project_env
from bench.throughput import TARGET_RATIO, parse_steps, summarise
from posttrain.config import parse_params, set_override
from posttrain.spec import recipe_specs

TRAINER_STAGES = ("sft", "dpo", "grpo")


def write_params(root: Path, params: dict[str, Any]) -> None:
    import yaml

    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage_process(root: Path, stage: str, out: Path, tag: str, *extra: str, timeout: float | None = None) -> float:
    """`python -m stages.<stage>` in `root`; its output to out/<tag>.log; wall seconds (raises on failure;
    subprocess.TimeoutExpired past `timeout`)."""
    started = time.perf_counter()
    with (out / f"{tag}.log").open("w") as handle:
        done = subprocess.run(
            [PYTHON, "-m", f"stages.{stage}", *extra],
            cwd=root,
            env=project_env(root, {"HF_DATASETS_OFFLINE": "1"}),
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (out / f"{tag}.log").read_text()[-3000:]
        raise RuntimeError(f"stage {stage} failed (exit {done.returncode}):\n{tail}")
    return round(seconds, 2)


def metrics_of(root: Path, stage: str) -> dict[str, Any]:
    path = root / "artifacts" / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def recipe_runs(params: dict[str, Any], root: Path) -> list[tuple[str, str, str, list[str]]]:
    """(name, stage module, log tag, extra args) of the stages the recipe runs, in run order (its StageSpecs)."""
    runs = []
    for s in recipe_specs(parse_params(params), root).values():
        tag = f"{s.kind}-{s.variant}" if s.variant else s.kind  # a file name: letters, digits, '-' only
        runs.append((s.name, s.kind, tag, ["--variant", s.variant] if s.variant else []))
    return runs


def run_recipe(root: Path, params: dict[str, Any], out: Path, result: dict[str, Any], save: Any) -> None:
    result["recipe"] = {"stages": {}}
    for name, stage, tag, extra in recipe_runs(params, root):
        log(f"recipe: {name}")
        wall = run_stage_process(root, stage, out, tag, *extra)
        m = metrics_of(root, name)
        result["recipe"]["stages"][name] = {
            "wall_seconds": wall,
            **{
                k: m.get(k)
                for k in (
                    "seconds",
                    "steps",
                    "tokens_per_second",
                    "peak_rss_mb",
                    "peak_gpu_mb",
                    "device",
                    "precision",
                    "final_train_loss",
                )
                if k in m
            },  # fmt: skip
        }
        save()
    evaluation = json.loads((root / "artifacts" / "metrics" / "eval.json").read_text())
    summary: dict[str, Any] = {}
    for model, info in evaluation["models"].items():
        summary[model] = {}
        for domain, scores in info["domains"].items():
            exact, ppl = scores.get("exact_match"), scores.get("perplexity")
            summary[model][domain] = {
                "exact_match": {k: exact[k] for k in ("mean", "ci_low", "ci_high", "n")} if exact else None,
                "perplexity": {k: ppl.get(k) for k in ("mean", "ci_low", "ci_high")} if isinstance(ppl, dict) else ppl,
            }
    result["recipe"]["eval"] = summary
    result["recipe"]["total_wall_seconds"] = round(
        sum(s["wall_seconds"] for s in result["recipe"]["stages"].values()), 1
    )
    save()


def bare_run(
    root: Path,
    stage: str,
    steps: int,
    threads: int,
    out: Path,
    tag: str,
    settings: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """bench/bare_trl.py on `root`'s input model; `settings`: the stage's resolved GPU settings (its `gpu_settings`)."""
    figures = out / f"{tag}.json"
    cmd = [PYTHON, str(REPO / "bench" / "bare_trl.py"), "--stage", stage, "--root", str(root), "--max-steps",
           str(steps), "--threads", str(threads), "--json", str(figures)]  # fmt: skip
    if settings is not None:
        cmd += ["--settings", json.dumps(settings)]
    started = time.perf_counter()
    with (out / f"{tag}.log").open("w") as handle:
        done = subprocess.run(cmd, cwd=root, env=project_env(root, {"HF_DATASETS_OFFLINE": "1"}), stdout=handle,
                              stderr=subprocess.STDOUT, timeout=timeout)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"bare {stage} failed:\n{(out / f'{tag}.log').read_text()[-3000:]}")
    data = json.loads(figures.read_text())
    figures.unlink()
    return {"wall_seconds": round(time.perf_counter() - started, 2), **data}


def stage_run(root: Path, params: dict[str, Any], stage: str, steps: int, out: Path, tag: str) -> dict[str, Any]:
    """The stage with `steps` steps, from scratch: no output folder, no checkpoint to resume."""
    run_params = json.loads(json.dumps(params))
    run_params[stage]["trainer"]["max_steps"] = steps
    write_params(root, run_params)
    shutil.rmtree(root / "artifacts" / "models" / stage, ignore_errors=True)
    for folder in (root / "checkpoints").glob(f"{stage}-*"):
        shutil.rmtree(folder, ignore_errors=True)
    wall = run_stage_process(root, stage, out, tag)
    m = metrics_of(root, stage)
    keys = ("tokens_per_second", "steps_per_second", "peak_rss_mb", "peak_gpu_mb", "final_train_loss", "steps",
            "tokens_seen", "threads", "device", "seconds", "eval_seconds")  # fmt: skip
    return {"wall_seconds": wall, **{k: m.get(k) for k in keys}}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run_throughput(root: Path, params: dict[str, Any], steps: dict[str, int], repeats: int, threads: int, out: Path,
                   result: dict[str, Any], save: Any) -> None:  # fmt: skip
    result["throughput"] = {"target_ratio": TARGET_RATIO, "repeats": repeats, "stages": {}}
    # Reverse pipeline order: a stage run rewrites its model folder, the next stage's input.
    for stage in reversed([s for s in TRAINER_STAGES if s in steps]):
        reps = []
        for i in range(repeats):
            log(f"throughput: {stage} rep {i + 1}: bare")
            bare = bare_run(root, stage, steps[stage], threads, out, f"bare-{stage}-{i + 1}")
            log(f"throughput: {stage} rep {i + 1}: stage")
            staged = stage_run(root, params, stage, steps[stage], out, f"stage-{stage}-{i + 1}")
            reps.append({"bare": bare, "stage": staged})
            log(
                f"{stage}: tokens/s bare {bare['tokens_per_second']} stage {staged['tokens_per_second']}; "
                f"loss {bare['final_train_loss']} / {staged['final_train_loss']}"
            )
        result["throughput"]["stages"][stage] = {
            "max_steps": steps[stage],
            "repeats": reps,
            **summarise(reps),  # the same ratios, median and target as bench/throughput.py
            "peak_gpu_ratios": [ratio(r["stage"]["peak_gpu_mb"], r["bare"]["peak_gpu_mb"]) for r in reps],
        }
        save()
    write_params(root, params)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, required=True, help="the recipe (copied to <root>/params.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. compute.device=cuda"
    )
    parser.add_argument("--root", type=Path, default=REPO, help="project copy to run in (default: this checkout)")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_recipe.json and the logs")
    parser.add_argument("--steps", default="sft=100,dpo=40,grpo=16", help="throughput step counts per stage")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: compute.num_threads)")
    parser.add_argument("--skip-recipe", action="store_true", help="throughput only (the recipe ran before)")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    import yaml

    root, out = args.root.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load(args.params.read_text())
    for item in args.set:
        set_override(params, item)
    write_params(root, params)
    threads = args.threads or params["compute"].get("num_threads") or 1
    result: dict[str, Any] = {"started": now(), "machine": machine_info(), "params": str(args.params),
                              "overrides": args.set}  # fmt: skip
    try:
        import torch

        if torch.cuda.is_available():
            result["gpu"] = {"name": torch.cuda.get_device_name(0), "torch": torch.__version__,
                             "cuda": torch.version.cuda}  # fmt: skip
    except ImportError:
        pass

    def save() -> None:
        (out / "gpu_recipe.json").write_text(json.dumps(result, indent=2) + "\n")

    save()
    if not args.skip_recipe:
        run_recipe(root, params, out, result, save)
    if not args.skip_throughput:
        run_throughput(root, params, parse_steps(args.steps), args.repeats, threads, out, result, save)
    result["finished"] = now()
    save()
    return result


if __name__ == "__main__":
    main()
