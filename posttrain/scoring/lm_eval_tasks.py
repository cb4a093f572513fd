"""lm-evaluation-harness on project-defined tasks: YAML plus local JSONL, nothing from the hub.

Two task kinds, written from held-out records (the prepared `test` split):

- `generate`: the model answers each prompt greedily; lm-eval's `exact_match` against the gold
  answer (generation stops at a newline or `max_gen_toks`). A conversational prompt is sent as its
  last user turn, which lm-eval wraps in the model's chat template when `apply_chat_template` is on.
- `perplexity`: `loglikelihood_rolling` over each record's `text` (word/byte perplexity and bits
  per byte): a probe of what a chain of stages cost on data it does not train. lm-eval gives no
  standard error for these corpus-level (weighted) perplexities: their `_stderr` is NaN.

`run(model_dir, tasks, work_dir)` writes the task files under `work_dir`, runs
`lm_eval.simple_evaluate` with its HF model wrapper on the model folder and returns, per task, each
metric with its standard error. Nothing comes from the hub: every task reads a local JSONL file
(`dataset_path: json`) and the model is a local folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.data.formats import prompt_turns
from posttrain.errors import DataError

TASK_PREFIX = "posttrain_"
# lm-eval metric names per task kind (keys of results[task] are "<metric>,<filter>").
METRICS = {
    "generate": ("exact_match",),
    "perplexity": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}


@dataclass(frozen=True)
class TaskSpec:
    """One project task: a name, its kind and the held-out records it is built from."""

    name: str
    kind: Literal["generate", "perplexity"]
    records: Sequence[dict[str, str]]
    max_gen_toks: int = 16


def _prompt_text(record: dict[str, str], where: str) -> str:
    if not record.get("messages"):
        return record["prompt"]
    users = [m["content"] for m in prompt_turns(record) if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: record {record['id']} has no user turn to ask; expected a conversational prompt")
    return users[-1]


def write_task(spec: TaskSpec, folder: Path) -> str:
    """Write `<folder>/<task>.yaml` and its JSONL; returns the lm-eval task name."""
    name = TASK_PREFIX + spec.name
    if not spec.records:
        raise DataError(f"lm-eval task {spec.name!r}: no records; expected held-out items")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as out:
        for record in spec.records:
            if spec.kind == "generate":
                if not record.get("answer"):
                    raise DataError(f"lm-eval task {spec.name!r}: record {record['id']} has no answer to match")
                row = {"prompt": _prompt_text(record, f"lm-eval task {spec.name!r}"), "answer": record["answer"]}
            else:
                row = {"text": record["text"]}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "metadata": {"version": 1.0},
    }
    if spec.kind == "generate":
        config |= {
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": spec.max_gen_toks, "do_sample": False},
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    # Surrounding whitespace only: otherwise the answer must be exactly the gold string.
                    "regexes_to_ignore": ["^\\s+", "\\s+$"],
                }
            ],
        }
    else:
        config |= {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": m, "aggregation": aggregation, "higher_is_better": False}
                for m, aggregation in zip(
                    METRICS["perplexity"], ("weighted_perplexity", "weighted_perplexity", "bits_per_byte"), strict=True
                )
            ],
        }
    # JSON is valid YAML, and keeps Jinja braces and newlines quoted exactly.
    (folder / f"{name}.yaml").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return name


def model_args(model_dir: Path, kind: str, device: str = "cpu") -> dict[str, Any]:
    """lm-eval's HF model arguments for tasks of `kind`, with the tokenizer's BOS in front exactly once.

    `generate`: lm-eval's default. A prompt rendered by a chat template that starts with the BOS is
    encoded without special tokens, any other prompt with them (the tokenizer adds its BOS, if any).
    `perplexity`: lm-eval conditions the first rolling window on its prefix token (the tokenizer's BOS
    where it has one) and by default would also encode the text with the BOS in front, scoring a second
    BOS as part of the text; `add_bos_token: False` leaves the prefix token the only one.
    """
    args: dict[str, Any] = {"pretrained": str(model_dir), "dtype": "float32", "device": device}
    if kind == "perplexity":
        args["add_bos_token"] = False
    return args


def run(
    model_dir: Path,
    tasks: Sequence[TaskSpec],
    work_dir: Path,
    *,
    chat: bool,
    batch_size: int = 16,
    device: str = "cpu",
    seed: int = 1234,
) -> dict[str, dict[str, float]]:
    """Scores of `model_dir` on `tasks`: {task: {metric: value, metric_stderr: value, n: items}}.

    `chat` runs lm-eval with `apply_chat_template=True` (the model folder's own template).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = {write_task(spec, work_dir): spec for spec in tasks}
    # Only our folder is indexed: lm-eval's stock tasks (which download from the hub) are not even listed.
    manager = TaskManager(include_path=str(work_dir), include_defaults=False)
    results: dict[str, Any] = {}
    for kind in METRICS:  # one lm-eval run per task kind: they need different BOS settings (model_args)
        of_kind = [name for name, spec in names.items() if spec.kind == kind]
        if not of_kind:
            continue
        run_results = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args(model_dir, kind, device),
            tasks=of_kind,
            task_manager=manager,
            batch_size=batch_size,
            apply_chat_template=chat,
            log_samples=False,
            bootstrap_iters=1000,  # for bootstrapped metrics; lm-eval's default 100,000 takes minutes on CPU
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        results.update(run_results["results"])
    scores: dict[str, dict[str, float]] = {}
    for name, spec in names.items():
        raw = results[name]
        entry: dict[str, float] = {"n": float(len(spec.records))}
        for metric in METRICS[spec.kind]:
            # lm-eval writes "N/A" where a metric has no standard error: NaN here.
            key = next(k for k in raw if k.split(",")[0] == metric)
            stderr = raw.get(key.replace(metric, f"{metric}_stderr", 1))
            entry[metric] = float(raw[key])
            entry[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else float("nan")
        scores[spec.name] = entry
    return scores
