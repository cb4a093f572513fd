"""MLflow test helpers: params with a temporary SQLite store, model folders with lineage, stage
metrics and eval.json files as the stages write them, and one call of `record_stage`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from helpers.tiny import REPO, tiny_raw
from posttrain.config import ArchitectureConfig, Params, params_hash, parse_params
from posttrain.io import json_hash
from posttrain.layout import Layout
from posttrain.lineage import parent_entry, write_lineage
from posttrain.models import chat_template
from posttrain.models.build import build_scratch_model
from posttrain.scoring.report import lineage_of
from posttrain.stage import StageResult

PROMPT = "12+34="


def make_params(root: Path, **sections: dict[str, Any]) -> Params:
    """The tiny recipe with tracking on, pointed at a store under `root`; `sections` update their section."""
    raw = tiny_raw(track=True, tracking={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"})
    for name, values in sections.items():
        raw[name].update(values)
    return parse_params(raw)


def make_project(root: Path) -> Layout:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    layout = Layout(root)
    layout.prepared.mkdir(parents=True, exist_ok=True)
    (layout.prepared / "manifest.json").write_text(json.dumps({"add": {"train": 100, "hash": "abc"}}))
    return layout


_TOKENIZER: Any = None


def tiny_tokenizer() -> Any:
    """A BPE tokenizer trained with `tokenizers` on arithmetic strings (trained once per session)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<pad>", "<eos>", "<unk>"])
        tok.train_from_iterator([f"{a}+{b}={a + b}" for a in range(40) for b in range(40)], trainer)
        _TOKENIZER = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
        )
    return _TOKENIZER


def make_model(layout: Layout, stage: str, seed: int, parents: tuple[str, ...] = ()) -> Path:
    """A ~1M-parameter LlamaForCausalLM + tokenizer saved into artifacts/models/<stage>/ with lineage.json.

    A copy is kept in <root>/sources/<stage>-<seed> so a test can compare against it later."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = build_scratch_model(ArchitectureConfig(), tokenizer)  # the default ~1M-parameter Llama
    folder = layout.model(stage)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    section = {"seed": seed, "stage": stage}
    write_lineage(
        folder,
        stage=stage,
        root=layout.root,
        parents=[parent_entry(layout.model(p), layout.root) for p in parents],
        params=section,
        params_hash=params_hash(section),
        seed=seed,
        data_manifest=layout.prepared / "manifest.json",
        extra={chat_template.LINEAGE_KEY: chat_template.fingerprint(tokenizer)},
    )
    source = layout.root / "sources" / f"{stage}-{seed}"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(folder, source)
    return folder


def write_stage_metrics(layout: Layout, stage: str, steps: int = 4) -> dict[str, Any]:
    """A training stage's metrics JSON: scalars, the Trainer's log history and a continual-eval series."""
    history = [
        {
            "loss": 2.0 - 0.25 * i,
            "learning_rate": 1e-3 * (1 - i / steps),
            "grad_norm": 1.0 + i,
            "epoch": i / steps,
            "step": 10 * (i + 1),
        }
        for i in range(steps)
    ]
    history.append({"train_runtime": 3.5, "train_loss": 1.6, "step": 10 * steps})
    data = {
        "train_loss": 1.6,
        "steps": 10 * steps,
        "seconds": 3.5,
        "tokens_per_second": 1234.5,
        "log_history": history,
        "continual_eval": [
            {"step": 20, "domain": "add", "exact_match": 0.25},
            {"step": 40, "domain": "add", "exact_match": 0.5},
        ],
    }
    path = layout.metrics(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


def score(mean: float, half: float = 0.02, n: int = 500) -> dict[str, Any]:
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def write_eval(
    layout: Layout,
    models: dict[str, dict[str, dict[str, Any]]],
    forgetting: dict[str, dict[str, float]],
    engine: str = "hf",
) -> None:
    """eval.json as the evaluate stage writes it (docs/eval-schema.md): scores, each model's lineage from its
    lineage.json, the prepared data's hash and the generation engine."""
    data = {
        "schema_version": 1,
        "generation": {"engine": engine},
        "config": {"confidence": 0.95, "bootstrap_samples": 1000, "seed": 0},
        "prepared_manifest_hash": json_hash(layout.prepared / "manifest.json"),
        "stages": list(models),
        "models": {
            m: {
                "path": f"artifacts/models/{m}",
                "content_hash": json.loads((layout.model(m) / "lineage.json").read_text())["content_hash"],
                "lineage": lineage_of(layout, layout.model(m)),
                "domains": {d: {"n_items": s["n"], "exact_match": s, "pass_at_k": None} for d, s in per.items()},
            }
            for m, per in models.items()
        },
        "forgetting": {
            "metric": "exact_match",
            "scores": {m: {d: s["mean"] for d, s in per.items()} for m, per in models.items()},
            "forgetting": {
                m: {
                    d: {"value": v, "ci_low": v - 0.01, "ci_high": v + 0.01, "best_earlier_stage": "sft"}
                    for d, v in per.items()
                }
                for m, per in forgetting.items()
            },
        },
        "summary": {f"{m}.{d}.exact_match": s["mean"] for m, per in models.items() for d, s in per.items()},
    }
    for m, per in forgetting.items():
        data["models"][m]["forgetting"] = {d: {"value": v} for d, v in per.items()}
    path = layout.artifacts / "metrics" / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def client_for(params: Params):  # noqa: ANN201 - MlflowClient, imported lazily
    from mlflow import MlflowClient

    return MlflowClient(params.tracking.tracking_uri, params.tracking.tracking_uri)


def record(stage: str, params: Params, layout: Layout, model: bool = True):  # noqa: ANN201
    from posttrain.tracking import runs

    result = StageResult(metrics={"from_result": 1.0}, model_dir=layout.model(stage) if model else None)
    return runs.record_stage(stage, params, layout, result, seconds=12.5)
