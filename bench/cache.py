"""Cache: after a full run, how long a no-change `dvc repro` and a no-change flow run take, and which
stages `dvc exp run -S grpo.trainer.learning_rate=...` reruns (must be exactly grpo and its descendants).

The no-change figures are taken in the end-to-end run's own project; the GRPO change in a clone of
it, so the finished run stays as it was for the other benchmarks.
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
    clone_project,
    commit,
    dvc,
    full_root,
    log,
    median,
    set_overrides,
    stages_run,
    timed,
    write_result,
)  # fmt: skip

EXPECTED_AFTER_GRPO = ["grpo", "merge", "evaluate"]


def flow_cmd(*args: str) -> list[str]:
    return [PYTHON, "-m", "posttrain.pipeline.cli", "run", *args]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--source", type=Path, default=None, help="finished run (default: the e2e run's)")
    args = parser.parse_args(argv)
    root = args.source or full_root()
    import yaml

    recipe = "default (params.yaml)"
    if yaml.safe_load((root / "params.yaml").read_text())["model"]["architecture"]["hidden_size"] < 64:
        recipe = "tiny (configs/tiny.yaml)"
    log(f"cache: no-change runs in {root}")

    repro = []
    for _ in range(args.repeats):
        done = timed(dvc("repro"), root)
        repro.append({"seconds": done["seconds"], "ran": stages_run(done["stdout"])})
    status = [timed(dvc("status"), root)["seconds"] for _ in range(args.repeats)]

    # The first flow call may create Prefect's database (its own figure); the later ones are the
    # steady state a user sees.
    flows = []
    for _ in range(args.repeats + 1):
        done = timed(flow_cmd(), root)
        flows.append({"seconds": done["seconds"], "summary": done["stdout"].strip().splitlines()[-1:]})
    # Without Prefect (`posttrain run --no-prefect` = dvc repro under the workspace lock).
    no_prefect = [timed(flow_cmd("--no-prefect"), root)["seconds"] for _ in range(args.repeats)]

    log("cache: one GRPO parameter changed, in a clone")
    clone = clone_project(root, "cache-grpo")
    commit(clone, "the finished run")  # `dvc exp run` bases its experiment on a commit
    timed(dvc("status"), clone)  # the clone's files have new inodes: let DVC re-read its state first
    params = yaml.safe_load((clone / "params.yaml").read_text())
    old = params["grpo"]["trainer"]["learning_rate"]
    # What a user types: an experiment with one parameter set on the command line.
    overrides = set_overrides(params, {"grpo.trainer.learning_rate": old * 0.5})
    done = timed(dvc("exp", "run", "-n", "grpo-lr-half", *[a for o in overrides for a in ("-S", o)]), clone)
    ran = stages_run(done["stdout"])
    result = {
        "root": str(root),
        "recipe": recipe,
        "no_change_dvc_repro": {
            "runs": repro,
            "median_seconds": median([r["seconds"] for r in repro]),
            "stages_ran": sorted({s for r in repro for s in r["ran"]}),
            "target_seconds": 3.0,
        },
        "dvc_status_seconds": {"runs": status, "median_seconds": median(status)},
        "no_change_flow": {
            "first_call_seconds": flows[0]["seconds"],
            "runs": flows[1:],
            "median_seconds": median([r["seconds"] for r in flows[1:]]),
            "target_seconds": 10.0,
        },
        "no_change_no_prefect_seconds": {"runs": no_prefect, "median_seconds": median(no_prefect)},
        "grpo_change": {
            "changed": f"grpo.trainer.learning_rate {old} -> {old * 0.5}",
            "command": "dvc exp run -n grpo-lr-half " + " ".join(f"-S {o}" for o in overrides),
            "stages_ran": ran,
            "expected": EXPECTED_AFTER_GRPO,
            "exact": ran == EXPECTED_AFTER_GRPO,
            "seconds": done["seconds"],
        },
    }
    for key in ("no_change_dvc_repro", "no_change_flow"):
        entry = result[key]
        entry["target_met"] = entry["median_seconds"] <= entry["target_seconds"]
        log(f"  {key}: median {entry['median_seconds']:.2f} s (target {entry['target_seconds']} s)")
    log(f"  grpo change reran {ran} (expected {EXPECTED_AFTER_GRPO})")
    write_result("cache", result)
    return result


if __name__ == "__main__":
    main()
