"""Shared helpers of the benchmark scripts: scratch project copies, timed commands, machine facts, JSON.

Every pipeline run of the benchmarks happens in a scratch copy of the project (a fresh git + DVC
workspace under a temporary folder), never in the checkout itself: its artifacts, dvc.lock and
mlflow.db belong to whoever runs the pipeline there.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("BENCH_RESULTS", REPO / "artifacts" / "bench"))
SCRATCH = Path(os.environ.get("BENCH_SCRATCH", "/tmp/posttrain-bench"))
PYTHON = sys.executable
CODE_DIRS = ("posttrain", "stages", "flows")
STAGE_ORDER = ("prepare", "mix", "pretrain", "cpt", "sft", "dpo", "grpo", "merge", "evaluate")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU model, load and library versions (torch's thread count is recorded per figure)."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions: dict[str, str] = {"python": platform.python_version()}
    from importlib import metadata

    for name in ("torch", "transformers", "trl", "datasets", "accelerate", "dvc", "prefect", "mlflow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model,
        "cores": cores,
        "memory_gb": mem_gb,
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "versions": versions,
        "gpu": gpu_name(),
    }


def gpu_name() -> str:
    """The CUDA device torch sees, or "none (CPU only)"."""
    try:
        import torch
    except ImportError:
        return "none (CPU only)"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"


def now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- project copies


def make_project_copy(dest: Path, params_source: Path | None = None, threads: int | None = None) -> Path:
    """A fresh git + DVC workspace with the project's code, dvc.yaml and a recipe (default params.yaml).

    `threads` sets compute.num_threads in the copy's params.yaml (None: keep the recipe's value).
    """
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    for name in CODE_DIRS:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "dvc.yaml", dest / "dvc.yaml")
    params = yaml.safe_load((params_source or REPO / "params.yaml").read_text())
    if threads is not None:
        params["compute"]["num_threads"] = threads
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # merge and evaluate depend on artifacts/variants/ (git-tracked README), even with no variant declared.
    (dest / "artifacts" / "variants").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "artifacts" / "variants" / "README.md", dest / "artifacts" / "variants" / "README.md")
    (dest / ".dvc").mkdir(exist_ok=True)
    shutil.copy(REPO / ".dvc" / "config", dest / ".dvc" / "config")
    (dest / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    for name in (".gitignore", ".dvcignore"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, dest / name)
    (dest / ".gitignore").write_text((dest / ".gitignore").read_text() + "\n/.prefect-home/\n")
    git(dest, "init", "-q")
    commit(dest, "init")
    return dest


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=bench@local", "-c", "user.name=bench", *args], cwd=root, check=True,
                   capture_output=True)  # fmt: skip


def commit(root: Path, message: str) -> None:
    git(root, "add", "-A")
    git(root, "commit", "-qm", message, "--allow-empty")


def set_params(root: Path, updates: dict[str, Any]) -> None:
    """Set dotted keys (`sft.trainer.max_steps`) in the copy's params.yaml."""
    import yaml

    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in updates.items():
        node = params
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def set_overrides(params: dict[str, Any], updates: dict[str, Any]) -> list[str]:
    """`dvc exp run -S` arguments (Hydra override syntax) that turn `params` into `params` + `updates`.

    A dict value replaces the whole sub-tree: its keys are set (`+key=` where new) and the old keys it
    lacks are deleted (`~key`), so `cpt.schedule` is exactly the variant's schedule.
    """
    import yaml

    def scalar(value: Any) -> str:
        return (
            "null"
            if value is None
            else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        )

    out: list[str] = []
    for dotted, value in updates.items():
        node: Any = params
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, dict):
            old = node if isinstance(node, dict) else {}
            out += [f"{'' if k in old else '+'}{dotted}.{k}={scalar(v)}" for k, v in value.items()]
            out += [f"~{dotted}.{k}" for k in old if k not in value]
        else:
            out.append(f"{dotted}={scalar(value)}")
    return out


def project_env(root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(
        HF_HUB_OFFLINE="1",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",  # no __pycache__ inside code folders that are DVC deps
        # Prefect's state lives in the copy: nothing shared with other runs on this machine.
        PREFECT_HOME=str(root / ".prefect-home"),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / '.prefect-home' / 'prefect.db'}",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    env.pop("PREFECT_API_URL", None)
    if extra:
        env.update(extra)
    return env


SERVER_SETTLE_SECONDS = 15.0


class PrefectServer:
    """`prefect server start` on a free 127.0.0.1 port with its own database in `home`, for runs that
    should use a running server (PREFECT_API_URL) instead of a temporary one started per flow run."""

    def __init__(self, home: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.home = home
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def env(self, root: Path) -> dict[str, str]:
        env = project_env(root)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            PREFECT_API_URL=self.api_url,
        )
        return env

    def __enter__(self) -> PrefectServer:
        import urllib.error
        import urllib.request

        self.home.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        cmd = [PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(cmd, env=self.env(self.home), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
        while True:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                pass
            if self.process.poll() is not None or time.perf_counter() - started > 180:
                self.__exit__(None, None, None)
                raise RuntimeError(f"prefect server on port {self.port} did not become healthy")
            time.sleep(0.5)
        self.startup_seconds = round(time.perf_counter() - started, 2)
        # A long-running server is what users have; let the fresh one's start-up work (migrations,
        # first loops of its background services) finish before anything is timed against it.
        time.sleep(SERVER_SETTLE_SECONDS)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 3600,
          check: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run `cmd`; wall seconds, return code and output. Raises with the output's tail when it fails."""
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env or project_env(cwd), capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({done.returncode}) in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return {"seconds": round(seconds, 3), "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def bare_cmd(root: Path, stage: str, max_steps: int, threads: int, out: Path) -> list[str]:
    """bench/bare_trl.py: the same trainer stage of the finished project `root`, as a bare TRL script."""
    return [
        PYTHON, str(REPO / "bench" / "bare_trl.py"), "--stage", stage, "--root", str(root),
        "--max-steps", str(max_steps), "--threads", str(threads),
        "--output-dir", str(SCRATCH / f"bare-{stage}-out"), "--json", str(out),
    ]  # fmt: skip


def run_bare(root: Path, stage: str, steps: int, threads: int) -> dict[str, Any]:
    """Wall seconds of a bare run plus the figures it wrote (a stale JSON from an earlier run is removed first)."""
    out = SCRATCH / f"bare-{stage}.json"
    out.unlink(missing_ok=True)
    done = timed(bare_cmd(root, stage, steps, threads, out), root)
    # A real model's checkpoints take GBs (weights + optimizer state): nothing here reads them again.
    shutil.rmtree(SCRATCH / f"bare-{stage}-out", ignore_errors=True)
    return {"wall_seconds": done["seconds"], **read_json(out)}


def reset_stage(root: Path, stage: str) -> None:
    """Make DVC run `stage` for real: no output, no checkpoint to resume, no run cache, and no dvc.lock
    entry (with one, DVC would check the outputs out of its cache instead of running)."""
    import yaml

    lock_path = root / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text())
    if lock.get("stages", {}).pop(stage, None) is not None:
        lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
    for path in [root / "artifacts" / "models" / stage, root / ".dvc" / "cache" / "runs",
                 *(root / "checkpoints").glob(f"{stage}-*")]:  # fmt: skip
        if path.exists():
            shutil.rmtree(path)


def dvc(*args: str) -> list[str]:
    return [PYTHON, "-m", "dvc", *args]


def stages_run(output: str) -> list[str]:
    """The stages DVC actually ran, from its `Running stage 'x':` lines."""
    return re.findall(r"Running stage '([^']+)'", output)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- results


def write_result(name: str, data: dict[str, Any]) -> Path:
    """artifacts/bench/<name>.json with the machine and date attached."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "measured_at": now(), "machine": machine_info(), "code_commit": code_commit(), **data}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    log(f"wrote {path}")
    return path


def code_commit() -> str:
    """The commit of the code a benchmark measures (`+dirty` when tracked files differ from it)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    )
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def load_result(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return read_json(path) if path.is_file() else None


def clone_project(source: Path, name: str) -> Path:
    """A copy of a finished scratch project (git, DVC cache, artifacts, dvc.lock, mlflow.db)."""
    dest = SCRATCH / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns(".prefect-home"))
    return dest


def full_root() -> Path:
    """The scratch project of the last end-to-end run (bench/e2e.py)."""
    e2e = load_result("e2e")
    if not e2e or not Path(e2e["full_run"]["root"]).is_dir():
        raise SystemExit("no finished end-to-end run: run `python bench/run.py --only e2e` first")
    return Path(e2e["full_run"]["root"])


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over `vocab_size` ids (t0 = pad, t1 = eos, t2 = unk) for benchmarks whose data are
    synthetic ids: a real tokenizer's output layer would dominate a toy-sized model's cost."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1", unk_token="t2")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
