"""Tiny projects for the training-stage tests: data written directly per docs/design.md's contract.

Kept independent of posttrain.data so a training test fails only for a training reason.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from posttrain.config import Params, parse_params
from posttrain.data.formats import CONVERSATION_COLUMNS
from posttrain.layout import Layout

REPO = Path(__file__).resolve().parents[1]
TINY_ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}
TINY_TRAINER = {
    "learning_rate": 3.0e-3,
    "max_steps": 6,
    "per_device_train_batch_size": 8,
    "logging_steps": 2,
    "save_steps": 3,
}


def _record(domain: str, prompt: str, answer: str) -> dict[str, str]:
    text = prompt + answer
    rid = hashlib.sha256(json.dumps([domain, prompt, answer, text]).encode()).hexdigest()[:16]
    record = {"id": rid, "domain": domain, "prompt": prompt, "answer": answer, "text": text, "verifier": "exact"}
    return record | dict.fromkeys(CONVERSATION_COLUMNS, "")  # the prepare stage's full record schema


def _items(domain: str, n: int, rng: random.Random) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if domain == "add":
            out.append(_record(domain, f"{a}+{b}=", str(a + b)))
        elif domain == "sub":
            a, b = max(a, b), min(a, b)
            out.append(_record(domain, f"{a}-{b}=", str(a - b)))
        elif domain == "add3":
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            out.append(_record(domain, f"{a}+{b}=", str(a + b)))
        else:
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
            out.append(_record(domain, f"rev:{word}=", word[::-1]))
    return out


def tiny_raw_params(**stage_overrides: dict[str, Any]) -> dict[str, Any]:
    """The repo's params.yaml with a ~20k-parameter model, 6 steps per stage, tracking off."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["model"]["architecture"].update(TINY_ARCH)
    raw["model"]["tokenizer"]["vocab_size"] = 64
    raw["tracking"]["enabled"] = False
    for stage in ("pretrain", "cpt", "sft"):
        raw[stage]["trainer"] = dict(TINY_TRAINER)
        raw[stage]["eval_every"] = 3
        raw[stage]["eval_items"] = 8
        raw[stage]["max_length"] = 24
    for stage, override in stage_overrides.items():
        _deep_update(raw[stage], override)
    return raw


def _deep_update(target: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def make_project(
    root: Path, raw: dict[str, Any] | None = None, n_train: int = 120, seed: int = 0
) -> tuple[Params, Layout]:
    """Write params.yaml, prepared splits of every domain and the pretrain/cpt/sft mixtures under `root`."""
    raw = raw or tiny_raw_params()
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    params = parse_params(raw)
    layout = Layout(root)
    rng = random.Random(seed)
    train: dict[str, list[dict[str, str]]] = {}
    manifest: dict[str, Any] = {"domains": {}}
    for domain in params.data.domains:
        records = _items(domain, n_train + 16, rng)
        splits = {"train": records[:n_train], "val": records[n_train:], "test": records[n_train:]}
        train[domain] = splits["train"]
        for split, rows in splits.items():
            path = layout.prepared_split(domain, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_parquet(path, index=False)
        manifest["domains"][domain] = {"counts": {k: len(v) for k, v in splits.items()}}
    (layout.prepared / "manifest.json").write_text(json.dumps(manifest))
    write_mixture(layout, "pretrain", [r for d in ("add", "rev") for r in train[d]], "text")
    write_mixture(layout, "cpt", train["sub"] + train["add"][:30], "text")
    write_mixture(layout, "sft", [r for d in ("add", "sub") for r in train[d]], "prompt_completion")
    return params, layout


def write_mixture(layout: Layout, stage: str, records: list[dict[str, str]], fmt: str) -> None:
    folder = layout.mixture(stage)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "text":
        rows = [{"id": r["id"], "domain": r["domain"], "text": r["text"]} for r in records]
    else:
        rows = [
            {"id": r["id"], "domain": r["domain"], "prompt": r["prompt"], "completion": r["answer"]} for r in records
        ]
    pd.DataFrame(rows).to_parquet(folder / "train.parquet", index=False)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "ids": [r["id"] for r in records]}))
