"""The merge and evaluate stages end to end on tiny real models and tiny test splits."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers.tiny import char_tokenizer, save_tiny, tiny_model, train_to_memorize

from posttrain.config import params_hash, parse_params
from posttrain.data.formats import CONVERSATION_COLUMNS
from posttrain.errors import StageError
from posttrain.layout import Layout
from posttrain.lineage import parent_entry, verify_model_folder, write_lineage

ITEMS = {
    "add": [("12+34=", "46"), ("7+8=", "15"), ("50+25=", "75"), ("9+9=", "18"), ("31+4=", "35"), ("66+11=", "77")],
    "rev": [("rev:abc=", "cba"), ("rev:hello=", "olleh"), ("rev:xyz=", "zyx"), ("rev:dog=", "god")],
}


def write_model(layout: Layout, stage: str, model, tokenizer, parent: str | None) -> Path:
    folder = save_tiny(layout.model(stage), model, tokenizer)
    parents = [parent_entry(layout.model(parent), layout.root)] if parent else []
    write_lineage(folder, stage=stage, root=layout.root, parents=parents, params={}, params_hash="x", seed=0)
    return folder


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Layout:
    """pretrain (random) -> sft (memorized the test items) -> grpo (sft, slightly perturbed)."""
    layout = Layout(tmp_path_factory.mktemp("project"))
    for domain, pairs in ITEMS.items():
        rows = [
            {"id": f"{domain}{i}", "domain": domain, "prompt": p, "answer": a, "text": p + a, "verifier": "exact"}
            | dict.fromkeys(CONVERSATION_COLUMNS, "")  # the full record schema: plain items
            for i, (p, a) in enumerate(pairs)
        ]
        path = layout.prepared_split(domain, "test")
        path.parent.mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(path)
    tokenizer = char_tokenizer()
    model, _ = tiny_model(tokenizer, hidden=32, layers=2, seed=0)
    write_model(layout, "pretrain", model, tokenizer, None)
    pairs = [pair for pairs in ITEMS.values() for pair in pairs]
    train_to_memorize(model, tokenizer, [p for p, _ in pairs], [a for _, a in pairs], steps=80)
    write_model(layout, "sft", model, tokenizer, "pretrain")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-4)
    write_model(layout, "grpo", model, tokenizer, "sft")
    # A training stage's continual-evaluation series, for the stability-gap plot.
    series = [
        {"step": s, "domain": d, "loss": 1.0 / s, "exact_match": min(1.0, s / 100)}
        for s in (25, 50, 100)
        for d in ITEMS
    ]
    layout.metrics("sft").parent.mkdir(parents=True, exist_ok=True)
    layout.metrics("sft").write_text(json.dumps({"continual_eval": series}))
    return layout


def params_for(tiny_params: dict, **sections) -> object:
    raw = copy.deepcopy(tiny_params)
    # One thread: on a busy 2-core machine two torch threads spin against each other (~10x slower).
    raw["compute"] = {**raw.get("compute", {}), "num_threads": 1}
    raw.update(sections)
    return parse_params(raw)


def test_merge_stage_writes_model_lineage_and_metrics(project, tiny_params):
    from stages import merge

    params = params_for(
        tiny_params, merge={"method": "ties", "models": ["sft", "grpo"], "weights": [1.0, 1.0], "base": "pretrain"}
    )
    result = merge.run(params, project)
    out = project.model("merge")
    assert result.model_dir == out
    lineage = verify_model_folder(out)
    assert lineage["stage"] == "merge" and lineage["params_hash"] == params_hash(params.merge)
    parents = {(p["path"], p["weight"], p.get("role")) for p in lineage["parents"]}
    assert parents == {
        ("artifacts/models/sft", 1.0, None),
        ("artifacts/models/grpo", 1.0, None),
        ("artifacts/models/pretrain", None, "base"),
    }
    metrics = json.loads(project.metrics("merge").read_text())
    assert metrics["method"] == "ties" and metrics["weights"] == {"sft": 1.0, "grpo": 1.0}
    assert set(metrics["l2_distance_to_inputs"]) == {"sft", "grpo"}
    assert not list(out.parent.glob(".merge.tmp-*"))  # atomic: no temporary folder left
    from posttrain.models.loading import load_stage_model

    loaded = load_stage_model(out)
    assert loaded.model.config.hidden_size == 32


def test_adamerging_stage_records_its_coefficients(project, tiny_params):
    from stages import merge

    for domain in ITEMS:  # unlabeled prompts come from the val split (the fixture has test only)
        val = project.prepared_split(domain, "val")
        if not val.is_file():
            shutil.copy(project.prepared_split(domain, "test"), val)
    ada = {"steps": 4, "refresh": 2, "prompts_per_domain": 8, "max_new_tokens": 4, "domains": list(ITEMS)}
    params = params_for(
        tiny_params,
        merge={"method": "adamerging", "models": ["sft", "grpo"], "base": "pretrain", "adamerging": ada},
    )
    merge.run(params, project)
    metrics = json.loads(project.metrics("merge").read_text())
    lineage = verify_model_folder(project.model("merge"))
    assert metrics["method"] == "adamerging" and len(metrics["adamerging"]["coefficients"]) == 2
    assert lineage["merge"]["coefficients"] == metrics["adamerging"]["coefficients"]
    assert set(metrics["weights"]) == {"sft", "grpo"} and metrics["adamerging"]["prompts"] > 0


def test_merge_stage_refuses_models_of_different_lines(project, tiny_params, tmp_path):
    from stages import merge

    layout = Layout(tmp_path)
    tokenizer = char_tokenizer()
    for stage, seed in (("sft", 1), ("grpo", 2)):  # same architecture, trained separately
        model, _ = tiny_model(tokenizer, hidden=32, layers=2, seed=seed)
        write_model(layout, stage, model, tokenizer, None)
    params = params_for(tiny_params, merge={"method": "linear", "models": ["sft", "grpo"]})
    with pytest.raises(StageError, match="one fine-tuning line"):
        merge.run(params, layout)
    assert not layout.model("merge").exists()


def test_checkpoint_average_stage(project, tiny_params):
    from stages import merge

    layout = project
    states = []
    for step in (10, 20, 30):
        model, tokenizer = tiny_model(char_tokenizer(), hidden=32, layers=2, seed=step)
        folder = save_tiny(layout.root / "checkpoints" / "sft-abc" / f"checkpoint-{step}", model, tokenizer)
        (folder / "COMPLETE").write_text("")
        states.append(model.state_dict())
    params = params_for(tiny_params, merge={"method": "checkpoint_average", "models": ["sft"], "last_k": 2})
    merge.run(params, layout)
    from safetensors.torch import load_file

    merged = load_file(str(layout.model("merge") / "model.safetensors"))
    name = "model.embed_tokens.weight"
    assert torch.allclose(merged[name], (states[1][name] + states[2][name]) / 2, atol=1e-6)
    metrics = json.loads(layout.metrics("merge").read_text())
    assert metrics["inputs"] == ["sft/checkpoint-20", "sft/checkpoint-30"]


def test_evaluate_stage_end_to_end(project, tiny_params):
    from stages import evaluate

    evaluate_section = {
        "models": ["pretrain", "sft", "grpo"],
        "domains": ["add", "rev"],
        "max_items": 100,
        "batch_size": 8,
        "max_new_tokens": 6,
        "pass_at_k": {"n": 4, "k": [1, 2], "temperature": 0.8, "max_items": 4},
        "bootstrap_samples": 200,
    }
    params = params_for(tiny_params, evaluate=evaluate_section)
    result = evaluate.run(params, project)
    report = json.loads(project.metrics("eval").read_text())
    assert report["stages"] == ["pretrain", "sft", "grpo"] and report["domains"] == ["add", "rev"]
    sft_add = report["models"]["sft"]["domains"]["add"]
    assert sft_add["exact_match"]["mean"] == 1.0 and sft_add["exact_match"]["n"] == len(ITEMS["add"])
    assert report["models"]["pretrain"]["domains"]["add"]["exact_match"]["mean"] == 0.0
    assert set(sft_add["pass_at_k"]) >= {"1", "2"}
    assert sft_add["loss"]["mean"] < report["models"]["pretrain"]["domains"]["add"]["loss"]["mean"]
    assert report["models"]["sft"]["content_hash"] == verify_model_folder(project.model("sft"))["content_hash"]
    # pretrain -> sft improves (negative forgetting); grpo ~ sft.
    assert report["forgetting"]["forgetting"]["sft"]["add"]["value"] == -1.0
    assert report["forgetting"]["forgetting"]["pretrain"]["add"] is None
    assert result.metrics == report["summary"] and result.metrics["sft.rev.exact_match"] == 1.0
    # The engine that generated (compute.generation.engine auto on CPU: hf), top level and per model,
    # with what it generated; the generated tokens/s also reach the stage's metrics (MLflow).
    assert report["generation"] == {"engine": "hf"}
    for stage in ("pretrain", "sft", "grpo"):
        generation = report["models"][stage]["generation"]
        assert generation["engine"] == "hf" and generation["generated_tokens"] > 0 and generation["seconds"] > 0
        assert result.metrics[f"{stage}.generated_tokens_per_second"] == round(generation["tokens_per_second"], 2)
    for name in (
        "eval_scores.png",
        "eval_scores.csv",
        "forgetting.png",
        "forgetting.json",
        "stability_gap.png",
        "stability_gap.csv",
    ):
        assert (project.plots / name).stat().st_size > 0, name
    gap = pd.read_csv(project.plots / "stability_gap.csv")
    assert set(gap["stage"]) == {"sft"} and len(gap) == 6


def test_evaluate_with_paged_scores_as_hf_item_for_item(project, tiny_params):
    """The same models and items through continuous batching: the same exact match per item (greedy is
    an argmax; posttrain.scoring.engines), the engine recorded in eval.json."""
    from stages import evaluate

    section = {"models": ["pretrain", "sft"], "domains": ["add", "rev"], "batch_size": 8, "max_new_tokens": 6,
               "pass_at_k": {"n": 2, "k": [1], "max_items": 2}, "bootstrap_samples": 50}  # fmt: skip
    reports = {}
    for engine in ("hf", "paged"):
        params = params_for(tiny_params, evaluate={**section, "generation": {"engine": engine}})
        evaluate.run(params, project)
        reports[engine] = json.loads(project.metrics("eval").read_text())
    assert reports["paged"]["generation"]["engine"] == "paged"
    assert reports["paged"]["config"]["generation"]["engine"] == "paged"  # the setting, as written
    for stage in ("pretrain", "sft"):
        assert reports["paged"]["models"][stage]["generation"]["engine"] == "paged"
        for domain in ("add", "rev"):
            hf, paged = (reports[e]["models"][stage]["domains"][domain] for e in ("hf", "paged"))
            # Mean and bootstrap CI (the same resampled items for both): equal per-item hits give equal CIs.
            assert paged["exact_match"] == hf["exact_match"], (stage, domain)
            assert paged["loss"] == hf["loss"]  # no generation in the loss
    # Item for item on the completions themselves: tests/unit/test_engines.py.
    assert reports["paged"]["forgetting"]["scores"] == reports["hf"]["forgetting"]["scores"]
    assert reports["paged"]["forgetting"]["scores"]["sft"] == {"add": 1.0, "rev": 1.0}


def test_evaluate_stage_names_missing_model(project, tiny_params, tmp_path):
    from stages import evaluate

    params = params_for(tiny_params, evaluate={"models": ["dpo"], "domains": ["add"]})
    layout = Layout(tmp_path)
    path = layout.prepared_split("add", "test")
    path.parent.mkdir(parents=True)
    path.write_bytes(project.prepared_split("add", "test").read_bytes())
    with pytest.raises(StageError, match="artifacts/models/dpo"):
        evaluate.run(params, layout)
