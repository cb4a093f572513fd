"""Project folders for tests: written directly (training tests), copied from this repository (DVC,
CLI and pipeline tests), or prepared by the real prepare/mix stages with an untrained input model
(DPO/GRPO tests). Every one starts from `helpers.tiny.tiny_raw`."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from helpers.tiny import REPO, tiny_raw
from posttrain import io
from posttrain.config import Params, load_params, parse_params
from posttrain.data.domains import RECORD_COLUMNS
from posttrain.data.formats import CONVERSATION_COLUMNS
from posttrain.layout import Layout
from posttrain.models import build, chat_template
from posttrain.spec import sync_dvc_yaml
from posttrain.training.outputs import write_model_output

# What the training-stage tests change in configs/tiny.yaml: a shorter context, the same trainer for
# pretrain/cpt/sft with a higher learning rate, and continual evaluation every 3 steps.
_TRAINER = {
    "learning_rate": 3.0e-3,
    "max_steps": 6,
    "per_device_train_batch_size": 8,
    "logging_steps": 2,
    "save_steps": 3,
}
_STAGE = {"trainer": _TRAINER, "eval_every": 3, "eval_items": 8, "max_length": 24}
TRAINING: dict[str, Any] = {
    "model": {"architecture": {"max_position_embeddings": 32}},
    "pretrain": _STAGE,
    "cpt": _STAGE,
    "sft": _STAGE,
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


def make_project(
    root: Path, raw: dict[str, Any] | None = None, n_train: int = 120, seed: int = 0
) -> tuple[Params, Layout]:
    """Write params.yaml, prepared splits of every domain and the pretrain/cpt/sft mixtures under `root`."""
    raw = raw or tiny_raw(TRAINING)
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
        rows = [{"id": r["id"], "domain": r["domain"], "text": r["text"], "conversation": ""} for r in records]
    else:
        rows = [
            {"id": r["id"], "domain": r["domain"], "prompt": r["prompt"], "completion": r["answer"]} for r in records
        ]
    pd.DataFrame(rows).to_parquet(folder / "train.parquet", index=False)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "ids": [r["id"] for r in records]}))


# What the DPO/GRPO tests change: smaller mixtures, a one-layer model, 3 steps logged every step,
# on-policy DPO pairs.
STEPS = 3
_SHORT = {"trainer": {"max_steps": STEPS, "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 2},
          "eval_items": 8}  # fmt: skip
DPO_GRPO: dict[str, Any] = {
    "mixtures": {stage: {"total": 48} for stage in ("pretrain", "cpt", "sft", "dpo", "grpo")},
    "model": {"tokenizer": {"vocab_size": 96}, "architecture": {"num_hidden_layers": 1}},
    "dpo": {**_SHORT, "pairs": "on_policy", "on_policy_samples": 4},
    "grpo": {**_SHORT, "num_generations": 4},
}


# --------------------------------------------------------------------------- copies of this repository


def copy_variants_folder(root: Path) -> None:
    """artifacts/variants/ with its git-tracked README: merge and evaluate depend on the folder."""
    (root / "artifacts" / "variants").mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "artifacts" / "variants" / "README.md", root / "artifacts" / "variants" / "README.md")


def make_small_project(tmp_path: Path, raw: dict[str, Any]) -> Path:
    """A copy of the project (code, dvc.yaml, DVC config) with tiny params, in a fresh git repo."""
    root = tmp_path / "project"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("posttrain", "stages"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    (root / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    # What `dvc init` would add besides the config.
    (root / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    shutil.copy2(REPO / ".dvcignore", root / ".dvcignore")
    copy_variants_folder(root)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sync_dvc_yaml(parse_params(raw), root)  # dvc.yaml is the recipe's, as `posttrain sync-deps` writes it
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def make_project_copy(dest: Path, params_source: Path = REPO / "configs" / "tiny.yaml") -> Path:
    """A fresh git + DVC workspace holding the project's code, its dvc.yaml and the tiny recipe."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("posttrain", "stages", "flows"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(params_source, dest / "params.yaml")
    sync_dvc_yaml(
        load_params(dest / "params.yaml"), dest
    )  # dvc.yaml is the recipe's, as `posttrain sync-deps` writes it
    copy_variants_folder(dest)
    (dest / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", dest / ".dvc" / "config")
    (dest / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    shutil.copy(REPO / ".gitignore", dest / ".gitignore")
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], dest)
    return dest


def project_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=project_env(cwd), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
        )
    return done


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def build_trained_input_project(params: Params, root: Path, model_stage: str) -> Layout:
    """Real prepare + mix output and an untrained tiny model written as `model_stage`'s output."""
    import torch

    from stages import mix, prepare

    layout = Layout(root)
    prepare.run(params, layout)
    mix.run(params, layout)
    texts = [
        r["text"]
        for d in params.data.domains
        for r in io.read_parquet(layout.prepared_split(d, "train"), RECORD_COLUMNS)
    ]
    special = chat_template.special_tokens_of(params.model.chat_template or "")
    tokenizer = build.train_tokenizer(texts, params.model.tokenizer, extra_special=special)
    torch.manual_seed(0)
    model = build.build_scratch_model(params.model.architecture, tokenizer)
    build.install_template(model, tokenizer, params.model, root)
    write_model_output(
        model_stage, model, tokenizer, params=params, layout=layout, section=params.stage_section(model_stage),
        parents=[], data_manifest=None, metrics={},
    )  # fmt: skip
    return layout
