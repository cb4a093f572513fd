"""The prepared GPU check (docs/gpu.md): every trainer stage of the throughput recipe against the
bare TRL script with the same settings, side by side in one run, then FSDP2 at world size 1; one JSON.

    bench/gpu_check.sh                                   # on the GPU machine: carried wheels, then this
    bench/gpu_check.sh --recipe configs/gpu-throughput-1.5b.yaml --stages cpt,sft
    python bench/gpu_check.py --cpu-smoke                # the same code at toy size on CPU (CI, < 2 min)

In a scratch copy of the project (bench.common.make_project_copy; the recipe as its params.yaml), in
DAG order, each as its own process with dvc.yaml's command (`python -m stages.<name>`, no DVC needed):
prepare, mix, pretrain (a few steps: the random model every later stage starts from), then for each
measured stage (cpt, sft, dpo, grpo) the stage with a fixed step count, and right after it
bench/bare_trl.py on the same input model, data, seed and step count with the GPU settings the stage
resolved (its metrics' `gpu_settings`: attention, kernels, TF32, torch.compile, packing, activation
checkpointing). Per stage: tokens/s of both (training seconds), MFU of both from the stage's FLOPs per
token (posttrain.training.flops), peak GPU memory (CPU: peak RSS), the ratio stage / bare (target 0.97)
and whether the final losses agree. Last, the sft stage through `compute.launcher: accelerate` with
configs/accelerate/fsdp.yaml at one process: the sharded path must write a full model folder that
loads (hashes checked) with every weight of the model and finite logits.

Every subprocess gets the time left of `--budget-seconds` (default 480): a part that runs out is
recorded as such and the rest skipped, and the JSON (written after every part) keeps what ran.

`--cpu-smoke` runs the same recipe, driver, stage functions and bare script at toy size on CPU, the
stage and bare runs inside the driver's process (a process per run would spend most of its time
importing torch and TRL), FSDP through accelerate as on the GPU. Its figures are a code-path check,
never a GPU measurement: MFU is null there (no CPU peak), and in one process the peak RSS is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/<script>.py`: make `bench` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PYTHON, REPO, RESULTS, log, machine_info, make_project_copy, now, project_env
from bench.gpu_recipe import bare_run, metrics_of, run_stage_process, write_params
from bench.throughput import parse_steps
from posttrain.config import parse_params, set_override

MEASURED = ("cpt", "sft", "dpo", "grpo")
DEFAULT_STEPS = {"pretrain": 2, "cpt": 20, "sft": 20, "dpo": 10, "grpo": 8}
SMOKE_STEPS = {"pretrain": 2, "cpt": 3, "sft": 3, "dpo": 2, "grpo": 2}
FSDP_STEPS = {"gpu": 4, "smoke": 2}
RATIO_TARGET = 0.97
# The MFU targets (docs/gpu.md) per recipe (the ~1.5B and ~0.5B throughput models); DPO's holds for both.
MFU_TARGETS = {
    "gpu-throughput-1.5b": {"cpt": 0.40, "sft": 0.40, "dpo": 0.25},
    "gpu-throughput-0.5b": {"cpt": 0.30, "sft": 0.30, "dpo": 0.25},
}
# The same recipe at toy size on CPU: a 2-layer model, 128-token rows, a handful of rows per stage.
SMOKE_OVERRIDES = [
    "compute.device=cpu",
    "compute.num_threads=1",
    "model.architecture={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
    "num_key_value_heads: 1, max_position_embeddings: 160, rope_theta: 10000.0, tie_word_embeddings: true}",
    "data.domains.add.n_items=300",
    "data.domains.sub.n_items=300",
    "data.domains.rev.n_items=300",
    "data.domains.add3.n_items=600",
    "data.split.val_fraction=0.05",
    "data.split.test_fraction=0.05",
    "mixtures.pretrain.total=16",
    "mixtures.pretrain.group=12",
    "mixtures.cpt.total=16",
    "mixtures.cpt.group=12",
    "mixtures.sft.total=16",
    "mixtures.sft.group=4",
    "mixtures.dpo.total=8",
    "mixtures.dpo.group=3",
    "mixtures.grpo.total=8",
    "mixtures.grpo.group=2",
    *(f"{stage}.{key}" for stage in ("pretrain", "cpt", "sft", "dpo", "grpo")
      for key in ("max_length=128", "eval_items=2", "trainer.gradient_accumulation_steps=1",
                  "trainer.logging_steps=1")),
    *(f"{stage}.trainer.per_device_train_batch_size=4" for stage in ("pretrain", "cpt", "sft", "grpo")),
    "dpo.trainer.per_device_train_batch_size=2",
    "grpo.num_generations=4",
]  # fmt: skip
# Where the tokenizer folder comes from on the GPU machine: bench/gpu_wheels.sh packs SmolLM2's.
PAYLOAD = Path(os.environ.get("GPU_PAYLOAD", REPO / ".gpu-payload"))
EXTRA_VERSIONS = ("pyarrow", "pandas", "pydantic", "peft", "tokenizers", "safetensors", "liger-kernel", "kernels",
                  "flash-attn", "numpy", "triton")  # fmt: skip


class OutOfTime(Exception):
    """The check's time budget ran out inside a part (recorded; the remaining parts are skipped)."""


class Clock:
    """The time budget; it starts when bench/gpu_check.sh started (GPU_CHECK_T0: the wheels' install counts)."""

    def __init__(self, budget: float) -> None:
        already = time.time() - float(os.environ.get("GPU_CHECK_T0") or time.time())
        self.started = time.perf_counter() - max(0.0, already)
        self.budget = budget

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def timeout(self) -> float:
        left = self.left() - 5.0  # keep a few seconds to write the JSON
        if left <= 0:
            raise OutOfTime(f"time budget of {self.budget:.0f} s spent")
        return left


class Runner:
    """Runs a stage or the bare script: one process each on the GPU (as dvc.yaml does), in this process for
    the CPU smoke run, where importing torch and TRL (~10 s per process) would be most of the time."""

    def __init__(self, root: Path, logs: Path, clock: Clock, threads: int, in_process: bool) -> None:
        self.root, self.logs, self.clock, self.threads, self.in_process = root, logs, clock, threads, in_process

    def stage(self, stage: str, tag: str | None = None) -> float:
        if not self.in_process:
            return run_stage_process(self.root, stage, self.logs, tag or stage, timeout=self.clock.timeout())
        import importlib

        from posttrain.config import load_params
        from posttrain.layout import Layout

        started = time.perf_counter()
        cwd = Path.cwd()
        os.chdir(self.root)
        try:
            importlib.import_module(f"stages.{stage}").run(load_params(self.root / "params.yaml"), Layout(self.root))
        except Exception as error:  # as run_stage_process reports a failed stage process
            raise RuntimeError(f"stage {stage} failed: {type(error).__name__}: {error}") from error
        finally:
            os.chdir(cwd)
        return round(time.perf_counter() - started, 2)

    def bare(self, stage: str, steps: int, settings: dict[str, Any] | None) -> dict[str, Any]:
        if not self.in_process:
            return bare_run(self.root, stage, steps, self.threads, self.logs, f"bare-{stage}", settings=settings,
                            timeout=self.clock.timeout())  # fmt: skip
        from bench import bare_trl

        started = time.perf_counter()
        argv = ["--stage", stage, "--root", str(self.root), "--max-steps", str(steps), "--threads", str(self.threads)]
        figures = bare_trl.main([*argv, "--settings", json.dumps(settings)] if settings is not None else argv)
        return {"wall_seconds": round(time.perf_counter() - started, 2), **figures}


def versions() -> dict[str, str]:
    out = {}
    for name in EXTRA_VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


# --------------------------------------------------------------------------- set-up


def toy_tokenizer(root: Path, params: dict[str, Any], folder: Path) -> Path:
    """The smoke run's tokenizer folder: the pipeline's BPE tokenizer trained on the prepared train texts
    (with the chat template's tokens), saved like any tokenizer folder; read through model.tokenizer.path."""
    from posttrain.config import TokenizerConfig
    from posttrain.layout import Layout
    from posttrain.models import build, chat_template
    from stages.pretrain import prepared_texts

    layout = Layout(root)
    tokenizer = build.train_tokenizer(
        prepared_texts(layout, list(params["data"]["domains"])),
        TokenizerConfig(vocab_size=128),
        max_length=160,
        extra_special=chat_template.special_tokens_of(params["model"].get("chat_template") or ""),
    )
    tokenizer.save_pretrained(folder)
    return folder


def payload_tokenizer(work: Path) -> Path | None:
    """SmolLM2's tokenizer as bench/gpu_wheels.sh packed it (tokenizer.json xz-compressed), unpacked into `work`."""
    import lzma

    packed = PAYLOAD / "tokenizer"
    if not (packed / "tokenizer.json.xz").is_file():
        return None
    folder = work / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for path in packed.iterdir():
        if path.name.endswith(".xz"):
            (folder / path.name[:-3]).write_bytes(lzma.decompress(path.read_bytes()))
        else:
            shutil.copy(path, folder / path.name)
    return folder


def tokenizer_folder(args: argparse.Namespace, recipe_path: str | None, work: Path) -> Path:
    """--tokenizer; else the recipe's model.tokenizer.path in this checkout; else the payload's."""
    candidates = [args.tokenizer, REPO / recipe_path if recipe_path else None]
    for folder in candidates:
        if folder is not None and Path(folder).is_dir():
            return Path(folder).resolve()
    unpacked = payload_tokenizer(work)
    if unpacked is None:
        raise SystemExit(
            f"no tokenizer folder: {recipe_path!r} is not in this checkout and {PAYLOAD}/tokenizer is missing; run "
            "scripts/fetch_smollm2.py (or bench/gpu_wheels.sh, which packs it) or pass --tokenizer DIR"
        )
    return unpacked


def fsdp_config(work: Path, smoke: bool) -> Path:
    """configs/accelerate/fsdp.yaml at world size 1 (on CPU for the smoke run: no bf16 autocast there)."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())
    config["num_processes"] = 1
    if smoke:
        config.update(use_cpu=True, mixed_precision="no")
    path = work / "fsdp_ws1.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- parts


STAGE_KEYS = ("tokens_per_second", "steps_per_second", "tokens_seen", "steps_this_run", "seconds", "eval_seconds",
              "final_train_loss", "peak_gpu_mb", "peak_rss_mb", "flops_per_token", "achieved_tflops", "mfu",
              "peak_tflops", "mfu_basis", "update_mfu", "device", "device_name", "precision", "gpu_settings",
              "parameters", "trainable_parameters")  # fmt: skip


def peak_memory_mb(figures: dict[str, Any]) -> float | None:
    """Peak GPU memory allocated on CUDA, peak RSS on CPU (the one memory figure of the table)."""
    return figures.get("peak_gpu_mb") if figures.get("device") == "cuda" else figures.get("peak_rss_mb")


def compare(stage_figures: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """Bare's MFU from the stage's FLOPs per token (same model, data and settings) and the stage / bare ratios."""
    from posttrain.training.flops import Peak, mfu

    per_token, peak = stage_figures.get("flops_per_token"), stage_figures.get("peak_tflops")
    bare_mfu = None
    if per_token and bare.get("train_seconds"):
        _, bare_mfu = mfu(per_token, bare["tokens_seen"], bare["train_seconds"], Peak(peak, ""))
    s_tps, b_tps = stage_figures.get("tokens_per_second"), bare.get("tokens_per_second")
    s_mem, b_mem = peak_memory_mb(stage_figures), peak_memory_mb(bare)
    return {
        "bare_mfu": bare_mfu,
        "tokens_per_second_ratio": round(s_tps / b_tps, 4) if s_tps and b_tps else None,
        "peak_memory_ratio": round(s_mem / b_mem, 4) if s_mem and b_mem else None,
        "same_final_loss": stage_figures.get("final_train_loss") == bare.get("final_train_loss"),
    }


def run_fsdp(root: Path, params: dict[str, Any], out: Path, clock: Clock, smoke: bool) -> dict[str, Any]:
    """sft through accelerate + FSDP2 at world size 1; the written folder must load as the full model."""
    steps = FSDP_STEPS["smoke" if smoke else "gpu"]
    unsharded = metrics_of(root, "sft")
    run_params = json.loads(json.dumps(params))
    run_params["compute"].update(launcher="accelerate", accelerate_config=str(fsdp_config(out, smoke)))
    run_params["sft"]["trainer"]["max_steps"] = steps
    write_params(root, run_params)
    shutil.rmtree(root / "artifacts" / "models" / "sft", ignore_errors=True)
    try:
        wall = run_stage_process(root, "sft", out, "fsdp-sft", timeout=clock.timeout())
    finally:
        write_params(root, params)
    folder = root / "artifacts" / "models" / "sft"
    check = subprocess.run(
        [PYTHON, "-c", FSDP_LOAD_CHECK, str(folder)], cwd=root, env=project_env(root), capture_output=True, text=True,
        timeout=clock.timeout(),
    )  # fmt: skip
    if check.returncode != 0:
        raise RuntimeError(f"the FSDP-written sft folder does not load:\n{check.stderr[-3000:]}")
    loaded = json.loads(check.stdout.strip().splitlines()[-1])
    metrics = metrics_of(root, "sft")
    lineage = json.loads((folder / "lineage.json").read_text())
    return {
        "accelerate_config": "configs/accelerate/fsdp.yaml with num_processes: 1" + (" (CPU)" if smoke else ""),
        "steps": steps,
        "wall_seconds": wall,
        "distributed": lineage.get("distributed"),
        "tokens_per_second": metrics.get("tokens_per_second"),
        "mfu": metrics.get("mfu"),
        "peak_memory_mb": peak_memory_mb(metrics),
        "loaded": loaded,
        "same_parameter_count_as_unsharded_run": loaded["parameters"] == unsharded.get("parameters"),
        "ok": loaded["finite_logits"] and loaded["parameters"] == unsharded.get("parameters"),
    }


# Run in a fresh process on the folder: posttrain's own loader (content hashes checked against lineage.json).
FSDP_LOAD_CHECK = """
import json, sys
from pathlib import Path
import torch
from posttrain.models.loading import load_stage_model
loaded = load_stage_model(Path(sys.argv[1]))
model = loaded.model.eval()
ids = torch.tensor([loaded.tokenizer("12+34=", add_special_tokens=False)["input_ids"]])
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()),
                  "tensors": len(model.state_dict()), "finite_logits": bool(torch.isfinite(logits).all())}))
"""


def verdicts(result: dict[str, Any], recipe_name: str, device: str) -> dict[str, Any]:
    """Each target of docs/gpu.md against what this run measured ('not measured' off CUDA)."""
    if device != "cuda":
        return {"note": "not measured: no CUDA device (a CPU run checks the code path at toy size, nothing else)"}
    out: dict[str, Any] = {}
    mfu_targets = MFU_TARGETS.get(recipe_name, {"dpo": 0.25})
    for stage, entry in result.get("stages", {}).items():
        if "stage" not in entry:
            continue
        mfu, target = entry["stage"].get("mfu"), mfu_targets.get(stage)
        ratio = entry.get("tokens_per_second_ratio")
        out[stage] = {
            "mfu": mfu,
            "mfu_target": target,
            "mfu_met": None if target is None or mfu is None else mfu >= target,
            "ratio": ratio,
            "ratio_target": RATIO_TARGET,
            "ratio_met": None if ratio is None else ratio >= RATIO_TARGET,
        }
    return out


def render(result: dict[str, Any]) -> str:
    """The check's table (markdown), rendered from its JSON."""

    def f(value: Any, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec)

    where = result.get("gpu", {}).get("name") or "CPU (smoke, toy size: not a GPU measurement)"
    lines = [
        f"GPU check, {result['recipe']} on {where}; {result.get('finished') or 'unfinished'}",
        "",
        "| stage | steps | tokens/s stage / bare | ratio | MFU stage / bare | peak memory MB stage / bare | same loss |",
        "|---|---:|---|---:|---|---|---|",
    ]
    for stage, entry in result.get("stages", {}).items():
        s, b = entry.get("stage") or {}, entry.get("bare") or {}
        if not s or not b:
            lines.append(f"| {stage} | | {entry.get('error', 'not run')} | | | | |")
            continue
        lines.append(
            f"| {stage} | {s.get('steps_this_run')} | {f(s.get('tokens_per_second'), '.0f')} / "
            f"{f(b.get('tokens_per_second'), '.0f')} | {f(entry.get('tokens_per_second_ratio'))} | "
            f"{f(s.get('mfu'))} / {f(entry.get('bare_mfu'))} | {f(peak_memory_mb(s), '.0f')} / "
            f"{f(peak_memory_mb(b), '.0f')} | {entry.get('same_final_loss')} |"
        )
    fsdp = result.get("fsdp") or {}
    lines += ["", f"FSDP2 at world size 1: {'ok' if fsdp.get('ok') else fsdp.get('error', 'not run')}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "configs" / "gpu-throughput-0.5b.yaml")
    parser.add_argument("--stages", default=",".join(MEASURED), help="measured stages, a subset of cpt,sft,dpo,grpo")
    parser.add_argument("--steps", default=None, help="step counts, e.g. cpt=20,sft=20 (defaults: DEFAULT_STEPS)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code at toy size on CPU (CI)")
    parser.add_argument("--skip-fsdp", action="store_true")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: see tokenizer_folder)")
    parser.add_argument("--budget-seconds", type=float, default=480.0)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument(
        "--out", type=Path, default=None, help="the JSON (default artifacts/bench/gpu_check[_smoke].json)"
    )
    parser.add_argument(
        "--processes", action="store_true", help="with --cpu-smoke: one process per stage and bare run, as on the GPU"
    )
    args = parser.parse_args(argv)
    import yaml

    clock = Clock(args.budget_seconds)
    smoke = args.cpu_smoke
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if any(s not in MEASURED for s in stages):
        raise SystemExit(f"--stages: got {stages}; expected some of {list(MEASURED)}")
    steps = {**(SMOKE_STEPS if smoke else DEFAULT_STEPS), **parse_steps(args.steps)}
    out_path = (args.out or RESULTS / f"gpu_check{'_smoke' if smoke else ''}.json").resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    raw = yaml.safe_load(args.recipe.read_text())
    overrides = [*(SMOKE_OVERRIDES if smoke else []), *args.set]
    overrides += [f"{stage}.trainer.max_steps={n}" for stage, n in steps.items()]
    for item in overrides:
        set_override(raw, item)
    parse_params(raw, source=f"{args.recipe} + overrides")  # every override validated before any work
    recipe_tokenizer = (raw["model"].get("tokenizer") or {}).get("path")
    root = make_project_copy(work / "project", params_source=args.recipe)
    result: dict[str, Any] = {
        "started": now(),
        "mode": "cpu-smoke" if smoke else "gpu",
        "recipe": str(args.recipe.resolve().relative_to(REPO) if args.recipe.resolve().is_relative_to(REPO)
                      else args.recipe),
        "overrides": overrides,
        "steps": steps,
        "budget_seconds": args.budget_seconds,
        "machine": machine_info(),
        "versions": versions(),
        "parts_seconds": {},
        "stages": {},
    }  # fmt: skip
    try:
        import torch

        if torch.cuda.is_available():
            result["gpu"] = {
                "name": torch.cuda.get_device_name(0),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
            }
    except ImportError:
        pass

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")

    def part(name: str, fn: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn()
        finally:
            result["parts_seconds"][name] = round(time.perf_counter() - started, 2)
            save()

    try:
        # Data first (prepare, mix); the tokenizer folder (the smoke run trains its own on the prepared texts).
        write_params(root, raw)
        threads = int(raw["compute"].get("num_threads") or 0) or min(os.cpu_count() or 1, 8)
        runner = Runner(root, logs, clock, threads, in_process=smoke and not args.processes)
        for stage in ("prepare", "mix"):
            part(stage, lambda stage=stage: runner.stage(stage))
        folder = (
            toy_tokenizer(root, raw, work / "tokenizer") if smoke else tokenizer_folder(args, recipe_tokenizer, work)
        )
        raw["model"]["tokenizer"]["path"] = str(folder)
        params = json.loads(json.dumps(raw))
        write_params(root, params)
        result["tokenizer"] = str(folder)
        part("pretrain", lambda: runner.stage("pretrain"))
        for stage in stages:
            entry: dict[str, Any] = result["stages"].setdefault(stage, {})

            # The settings of both sides besides the resolved GPU ones (gpu_settings): the recipe's stage section.
            entry["section"] = {k: params[stage].get(k) for k in ("trainer", "max_length", "packing",
                                                                   "gradient_checkpointing")}  # fmt: skip

            def measure(stage: str = stage, entry: dict[str, Any] = entry) -> None:
                log(f"gpu check: {stage} (stage, {steps[stage]} steps)")
                entry["stage_wall_seconds"] = runner.stage(stage)
                figures = metrics_of(root, stage)
                entry["stage"] = {k: figures.get(k) for k in STAGE_KEYS}
                save()
                log(f"gpu check: {stage} (bare TRL, same settings)")
                bare = runner.bare(stage, steps[stage], figures.get("gpu_settings"))
                entry["bare"] = bare
                entry.update(compare(entry["stage"], bare))

            try:
                part(stage, measure)
            except RuntimeError as error:  # a failed stage or bare run: recorded, the others still run
                entry["error"] = str(error)[-2000:]
                save()
        if not args.skip_fsdp:
            try:
                result["fsdp"] = part("fsdp", lambda: run_fsdp(root, params, logs, clock, smoke))
            except RuntimeError as error:
                result["fsdp"] = {"ok": False, "error": str(error)[-2000:]}
    except (OutOfTime, subprocess.TimeoutExpired) as error:
        result["out_of_time"] = f"{type(error).__name__}: {error}"
        log(f"gpu check: {result['out_of_time']}; the parts after it were skipped")
    device = "cuda" if result.get("gpu") and not smoke else "cpu"
    result["targets"] = verdicts(result, args.recipe.stem, device)
    result["finished"] = now()
    result["total_seconds"] = round(time.perf_counter() - clock.started, 1)
    save()
    print(render(result))
    log(f"wrote {out_path} ({result['total_seconds']} s)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
