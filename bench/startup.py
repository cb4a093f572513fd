"""Start-up cost: import time of each stage module and of the heavy libraries a stage pulls in, and
the wall time of `posttrain --help`, `validate` and `status`, each in fresh processes, repeated.

`import stages.X` is what a stage costs before its function runs; the heavy libraries (torch,
transformers, TRL's trainers, peft, mlflow, prefect, dvc) are imported inside the functions that
need them, so their cost shows separately. `python -X importtime` names the slowest imports.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from bench.common import PYTHON, REPO, STAGE_ORDER, full_root, log, median, project_env, timed, write_result

LIBRARIES = {
    "torch": "import torch",
    "transformers": "import transformers",
    "trl.SFTTrainer": "from trl import SFTTrainer",
    "trl.DPOTrainer": "from trl import DPOTrainer",
    "trl.GRPOTrainer": "from trl import GRPOTrainer",
    "peft": "import peft",
    "mlflow": "import mlflow",
    "prefect": "import prefect",
    "dvc.repo": "import dvc.repo",
    "whole stack": "import torch, transformers, peft, mlflow, prefect, dvc.repo; from trl import SFTTrainer, DPOTrainer, GRPOTrainer",
}


def threads_code() -> str:
    return "import torch; print(torch.get_num_threads())"


def time_python(code: str, repeats: int, cwd: Path) -> dict[str, Any]:
    runs = [timed([PYTHON, "-c", code], cwd, env=project_env(cwd))["seconds"] for _ in range(repeats)]
    return {"median_seconds": round(median(runs), 3), "runs": runs}


def slowest_imports(code: str, cwd: Path, top: int = 5) -> list[dict[str, Any]]:
    """Third-party packages by cumulative import time (python -X importtime), slowest first: for each
    package the largest cumulative figure of any of its modules, wherever in the tree it was imported."""
    done = timed([PYTHON, "-X", "importtime", "-c", code], cwd, env=project_env(cwd))
    best: dict[str, float] = {}
    for line in done["stderr"].splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
        if not m:
            continue
        package = m.group(3).split(".")[0]
        if package in ("stages", "posttrain", "flows") or package.startswith("_"):
            continue
        best[package] = max(best.get(package, 0.0), int(m.group(2)) / 1e6)
    rows = [{"package": k, "cumulative_seconds": round(v, 3)} for k, v in best.items()]
    return sorted(rows, key=lambda r: -r["cumulative_seconds"])[:top]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lib-repeats", type=int, default=2)
    parser.add_argument("--project", type=Path, default=None, help="project for validate/status (default: e2e run's)")
    args = parser.parse_args(argv)
    project = args.project or full_root()
    baseline = time_python("pass", args.repeats, REPO)
    stages = {}
    for stage in STAGE_ORDER:
        code = f"import stages.{stage}"
        stages[stage] = {**time_python(code, args.repeats, REPO), "slowest": slowest_imports(code, REPO)}
        log(f"  import stages.{stage}: {stages[stage]['median_seconds']:.2f} s")
    libraries = {}
    for name, code in LIBRARIES.items():
        libraries[name] = time_python(code, args.lib_repeats, REPO)
        log(f"  {name}: {libraries[name]['median_seconds']:.2f} s")
    # The console script when the project is installed with it, else the module (same code path).
    script = Path(PYTHON).parent / "posttrain"
    cli_bin = [str(script)] if script.is_file() else [PYTHON, "-m", "posttrain.pipeline.cli"]
    cli = {}
    for name, cmd in {
        "posttrain --help": [*cli_bin, "--help"],
        "posttrain validate": [*cli_bin, "validate", "--root", str(project)],
        "posttrain status": [*cli_bin, "status", "--root", str(project)],
    }.items():
        runs = [timed(cmd, project, env=project_env(project))["seconds"] for _ in range(args.repeats)]
        cli[name] = {"median_seconds": round(median(runs), 3), "runs": runs, "target_seconds": 1.0}
        log(f"  {name}: {cli[name]['median_seconds']:.2f} s")
    heavy = [m for m in ("torch", "transformers", "trl", "mlflow", "prefect", "dvc")]
    probe = f"import sys, posttrain.pipeline.cli; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    leaked = timed([PYTHON, "-c", probe], REPO, env=project_env(REPO))["stdout"].strip()
    threads = int(timed([PYTHON, "-c", threads_code()], REPO, env=project_env(REPO))["stdout"].strip())
    result = {
        "python_startup": baseline,
        "stage_modules": stages,
        "libraries": libraries,
        "cli": cli,
        "heavy_modules_imported_by_cli": leaked.split(",") if leaked else [],
        "torch_threads_default": threads,
        "project": str(project),
        "cli_command": " ".join(cli_bin),
    }
    write_result("startup", result)
    return result


if __name__ == "__main__":
    main()
