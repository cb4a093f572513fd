"""The real-model recipe (configs/real-model.yaml) on the real SmolLM2-135M-Instruct, CI-sized: every stage
for 2 steps, the ablations' stage paths unchanged. Checks the chain's wiring, not its figures (those come from
`python bench/real_model.py run`, docs/real-model.md): each stage's no-learning record, the lore and chain
domains, preference accuracy, the WiSE-FT curve chosen on validation items, and eval.json's scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers.tiny import REPO, deep_update

from posttrain.config import parse_params
from posttrain.layout import Layout

SHORT = {"max_steps": 2, "logging_steps": 1, "save_steps": 2}


@pytest.mark.timeout(3600)
def test_real_model_recipe_runs_end_to_end(tmp_path: Path, smollm2: Path) -> None:
    from stages import cpt, dpo, evaluate, grpo, merge, mix, prepare, pretrain, sft

    raw = yaml.safe_load((REPO / "configs" / "real-model.yaml").read_text())
    warn = {"no_learning": {"action": "warn"}}  # 2 steps need not move the loss by 1%
    deep_update(
        raw,
        {
            "model": {"base": str(smollm2)},
            "mixtures": {"cpt": {"total": 8}, "sft": {"total": 8}, "dpo": {"total": 4}, "grpo": {"total": 4}},
            "pretrain": {"eval_items": 2},
            "cpt": {"trainer": {**SHORT, "per_device_train_batch_size": 4}, "eval_items": 2, **warn},
            "sft": {"trainer": {**SHORT, "per_device_train_batch_size": 4}, "eval_items": 2, **warn},
            "dpo": {"trainer": {**SHORT, "per_device_train_batch_size": 2}, "eval_items": 2, **warn},
            "grpo": {"trainer": {**SHORT, "per_device_train_batch_size": 4}, "eval_items": 2, "max_completion_length": 8,
                     "no_learning": {"action": "warn", "max_zero_variance_groups": None}},
            "merge": {"wise_ft": {"alphas": [0.0, 1.0], "eval_items": 2}},
            "evaluate": {"max_items": 4, "max_new_tokens": 8},
        },
    )  # fmt: skip
    shutil.copytree(REPO / "configs" / "data", tmp_path / "configs" / "data")
    params, layout = parse_params(raw), Layout(tmp_path)
    for stage in (prepare, mix, pretrain, cpt, sft, dpo, grpo, merge, evaluate):
        stage.run(params, layout)

    for stage in ("cpt", "sft", "dpo", "grpo"):
        record = json.loads(layout.metrics(stage).read_text())["no_learning"]
        assert record["action"] == "warn" and "unchanged_weights" in record["checks"], stage
    assert "zero_variance_groups" in json.loads(layout.metrics("grpo").read_text())["no_learning"]["checks"]
    choice = json.loads(layout.metrics("merge").read_text())["wise_ft"]
    assert [p["alpha"] for p in choice["curve"]] == [0.0, 1.0] and choice["alpha"] in (0.0, 1.0)
    report = json.loads(layout.metrics("eval").read_text())
    for stage in ("pretrain", "cpt", "sft", "dpo", "grpo", "merge"):
        scores = report["models"][stage]["domains"]
        assert scores["lore"]["perplexity"]["mean"] > 1.0 and scores["chat"]["perplexity"]["mean"] > 1.0
        assert scores["lore_qa"]["exact_match"]["n"] == 4 and scores["chain"]["exact_match"]["n"] == 4
        assert 0.0 <= scores["add3"]["preference"]["accuracy"]["mean"] <= 1.0
