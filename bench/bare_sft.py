"""A bare TRL script: SFTTrainer called directly on the same model, data and settings as the `sft` stage.

What a user would write without the pipeline: load a model folder, read a parquet of
prompt/completion pairs, build SFTConfig from the same `sft.trainer` keys of params.yaml, train,
save. It reproduces the stage's set-up exactly where it changes numbers (CPU fp32, no activation
checkpointing, seed and data_seed, completion-only loss, the recipe's cosine or WSD schedule with the
same warm-up formula), so the final loss must equal the stage's for the same seed. It has none of the
pipeline's extras: no hash checks, no length checks, no continual evaluation, no lineage, no MLflow.

    python bench/bare_sft.py --model M --data train.parquet --params params.yaml [--max-steps N]
        [--threads T] [--output-dir D] [--json out.json]
"""

from __future__ import annotations

import time

PROCESS_STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def lr_multiplier(step: int, total: int, schedule: dict) -> float:
    """The recipe's `cosine` and `wsd` shapes (warm-up (step + 1) / warmup; HF's own start from 0)."""
    name = schedule["name"]
    warmup = int(round(schedule.get("warmup_fraction", 0.0) * total))
    floor = schedule.get("min_lr_ratio", 0.0)
    if step < warmup:
        return min(1.0, (step + 1) / warmup)
    if name == "cosine":
        length = total - warmup
        p = 1.0 if length <= 0 else min(1.0, max(0.0, (step - warmup) / length))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    if name == "wsd":
        decay = int(round(schedule.get("decay_fraction", 0.2) * total))
        start = total - decay
        if step < start:
            return 1.0
        p = 1.0 if decay <= 0 else min(1.0, max(0.0, (step + 1 - start) / decay))
        return floor + (1.0 - floor) * (1.0 - p)
    raise SystemExit(f"bare_sft.py reproduces the cosine and wsd schedules only; got {name!r}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="model folder (e.g. artifacts/models/cpt)")
    parser.add_argument("--data", required=True, type=Path, help="parquet with prompt, completion columns")
    parser.add_argument("--params", required=True, type=Path, help="params.yaml to read the sft section from")
    parser.add_argument("--max-steps", type=int, default=None, help="override sft.trainer.max_steps")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: compute.num_threads or cores)"
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="checkpoints and final model (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    import os

    import datasets
    import pandas as pd
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    imported = time.perf_counter()
    params = yaml.safe_load(args.params.read_text())
    section = params["sft"]
    seed = params["seed"]
    trainer_keys = dict(section["trainer"])
    if args.max_steps is not None:
        trainer_keys["max_steps"] = args.max_steps
    schedule = section["schedule"]
    lr_multiplier(0, 1, schedule)  # an unsupported shape fails before any work
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or params["compute"].get("num_threads") or min(cores, 8)
    torch.set_num_threads(threads)
    set_seed(seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True)
    frame = pd.read_parquet(args.data)
    dataset = datasets.Dataset.from_pandas(frame[["prompt", "completion"]], preserve_index=False)

    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="bare-sft-"))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    config = SFTConfig(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        seed=seed,
        data_seed=seed,
        max_length=section["max_length"],
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        logging_strategy="steps",
        logging_first_step=True,
        logging_nan_inf_filter=False,
        save_strategy="steps",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **trainer_keys,
    )

    class ScheduledSFTTrainer(SFTTrainer):
        """The recipe's schedule (HF's own schedulers warm up from 0, a one-step shift)."""

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    lambda step: lr_multiplier(step, num_training_steps, schedule),
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

    trainer = ScheduledSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    trainer.save_model(str(output_dir / "final"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens = trainer.state.num_input_tokens_seen
    result = {
        "final_train_loss": losses[-1] if losses else None,
        "first_train_loss": losses[0] if losses else None,
        "steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 3),
        "steps_per_second": round(trainer.state.global_step / train_seconds, 3),
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / train_seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "import_seconds": round(imported - PROCESS_STARTED, 3),
        "in_process_seconds": round(time.perf_counter() - PROCESS_STARTED, 3),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "max_steps": trainer_keys["max_steps"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.output_dir is None:
        shutil.rmtree(output_dir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
