"""The GPU part of the suite on a machine without a GPU: dry run of `--config gpu` (config built,
parameters counted) and the `cpu-smoke` configuration through the same measuring code. On a CUDA
machine it also runs `--config gpu` for real."""

from __future__ import annotations

from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from bench.common import PYTHON, REPO, SCRATCH, log, read_json, timed, write_result


def run_gpu(*args: str) -> dict[str, Any]:
    SCRATCH.mkdir(parents=True, exist_ok=True)
    out = SCRATCH / "gpu.json"
    timed([PYTHON, str(REPO / "bench" / "gpu.py"), *args, "--json", str(out)], REPO)
    return read_json(out)


def main() -> dict[str, Any]:
    result = {"gpu_dry_run": run_gpu("--config", "gpu", "--dry-run"), "cpu_smoke": run_gpu("--config", "cpu-smoke")}
    if result["gpu_dry_run"]["cuda_available"]:
        result["gpu"] = run_gpu("--config", "gpu")
    log(
        f"gpu: {result['gpu_dry_run']['parameters']['total'] / 1e6:.0f}M parameters; measured on GPU: {'gpu' in result}"
    )
    write_result("gpu", result)
    return result


if __name__ == "__main__":
    main()
