"""End to end: the default recipe from a clean copy, stage by stage (`dvc repro --single-item`), timed.

Set-up is excluded (the venv exists); `--setup` also times `bash scripts/setup.sh` in a fresh clone
with a fresh venv (needs the wheels to be reachable: minutes, and network or a local cache).
The copy it leaves behind (path in the JSON) is what the quality, cache and overhead benchmarks use.
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from bench.common import (
    PYTHON,
    REPO,
    RESULTS,
    SCRATCH,
    STAGE_ORDER,
    dvc,
    log,
    make_project_copy,
    project_env,
    read_json,
    stages_run,
    timed,
    write_result,
)  # fmt: skip


def full_run(name: str, params_source: Path | None = None, threads: int | None = None) -> dict[str, Any]:
    root = SCRATCH / name
    if root.exists():
        shutil.rmtree(root)
    make_project_copy(root, params_source, threads=threads)
    log(f"full run in {root} ({params_source or 'params.yaml'}, threads={threads or 'recipe'})")
    stages: dict[str, Any] = {}
    started = time.perf_counter()
    for stage in STAGE_ORDER:
        done = timed(dvc("repro", "--single-item", stage), root)
        inner = re.search(rf"stage {stage}: finished in ([0-9.]+) s", done["stderr"])
        metrics_path = root / "artifacts" / "metrics" / ("eval.json" if stage == "evaluate" else f"{stage}.json")
        metrics = read_json(metrics_path) if metrics_path.is_file() else {}
        stages[stage] = {
            "wall_seconds": done["seconds"],  # the whole `dvc repro --single-item` process
            "stage_seconds": float(inner.group(1)) if inner else None,  # inside the stage function
            "train_seconds": metrics.get("seconds") if stage != "evaluate" else None,
            "ran": stages_run(done["stdout"]),
            "threads": metrics.get("threads"),
        }
        log(f"  {stage}: {done['seconds']:.1f} s")
        # A partial result after each stage: an interrupted run still leaves its figures.
        write_result("e2e-partial", {"full_run": {"root": str(root), "stages": stages, "finished": False},
                                     "trainer_metrics": trainer_metrics(root)})  # fmt: skip
    total = time.perf_counter() - started
    # The same thing as one `dvc repro` would do: nothing may be left to run.
    check = timed(dvc("repro"), root)
    return {
        "root": str(root),
        "trainer_metrics": trainer_metrics(root),
        "params_source": str(params_source or REPO / "params.yaml"),
        "total_seconds": round(total, 2),
        "stages": stages,
        "left_to_run_after": stages_run(check["stdout"]),
    }


TRAINER_STAGES = ("pretrain", "cpt", "sft", "dpo", "grpo")
TRAINER_KEYS = ("steps", "seconds", "eval_seconds", "steps_per_second", "tokens_seen", "tokens_per_second", "peak_rss_mb", "threads",
                "final_train_loss", "parameters")  # fmt: skip


def trainer_metrics(root: Path) -> dict[str, Any]:
    """What each trainer stage recorded about itself (tokens/s over trainer.train(), peak RSS of its process)."""
    out = {}
    for stage in TRAINER_STAGES:
        path = root / "artifacts" / "metrics" / f"{stage}.json"
        if path.is_file():
            m = read_json(path)
            out[stage] = {k: m.get(k) for k in TRAINER_KEYS}
    return out


def time_setup() -> dict[str, Any]:
    """`bash scripts/setup.sh` in a fresh clone with a fresh venv (pip's own sources and cache)."""
    root = SCRATCH / "setup-clone"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name in ("pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy(REPO / name, root / name)
    for name in ("scripts", "posttrain", "stages", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = project_env(root)
    env["PYTHON"] = "python3"
    done = timed(["bash", "scripts/setup.sh"], root, env=env, check=False, timeout=3600)
    return {
        "seconds": done["seconds"],
        "returncode": done["returncode"],
        "tail": done["stdout"][-1500:] + done["stderr"][-1500:],
    }


def collect_partial(root: Path, log_path: Path | None) -> dict[str, Any]:
    """An interrupted run: the trainer metrics its finished stages wrote, and the per-stage wall times
    this script logged (`[bench ...]   <stage>: <seconds> s` lines) if its log is given."""
    stages: dict[str, Any] = {}
    if log_path and log_path.is_file():
        for m in re.finditer(r"^\[bench [0-9:]+\]   (\w+): ([0-9.]+) s$", log_path.read_text(), re.M):
            if m.group(1) in STAGE_ORDER:
                stages[m.group(1)] = {"wall_seconds": float(m.group(2))}
    return write_result("e2e-partial", {"full_run": {"root": str(root), "stages": stages, "finished": False,
                                                     "log": str(log_path) if log_path else None},
                                        "trainer_metrics": trainer_metrics(root)})  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--collect", type=Path, default=None, help="record an interrupted run's root (no run)")
    parser.add_argument("--log", type=Path, default=None, help="with --collect: this script's log of that run")
    parser.add_argument("--params", type=Path, default=None, help="recipe (default: params.yaml)")
    parser.add_argument("--threads", type=int, default=None, help="compute.num_threads in the copy")
    parser.add_argument("--name", default="full", help="scratch folder name under /tmp/posttrain-bench")
    parser.add_argument("--setup", action="store_true", help="also time scripts/setup.sh with a fresh venv")
    args = parser.parse_args(argv)
    if args.collect:
        return collect_partial(args.collect, args.log)
    result = {"full_run": full_run(args.name, args.params, args.threads), "python": PYTHON}
    result["trainer_metrics"] = result["full_run"].pop("trainer_metrics")
    if args.setup:
        result["setup"] = time_setup()
    write_result("e2e", result)
    (RESULTS / "e2e-partial.json").unlink(missing_ok=True)  # superseded by the finished run's figures
    return result


if __name__ == "__main__":
    main()
