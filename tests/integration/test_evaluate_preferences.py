"""`evaluate.preference_domains`: a domain's test items scored as preference pairs for every model (chosen =
gold answer, rejected = a plausible wrong one, the same pairs for every model), with a bootstrap CI."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.projects import DPO_GRPO, build_trained_input_project
from helpers.tiny import tiny_raw

from posttrain.config import parse_params

EVALUATE = {"models": ["sft"], "domains": ["add", "add3"], "preference_domains": ["add3"], "max_items": 8}


def test_preference_accuracy_is_scored_on_the_test_pairs(tmp_path: Path) -> None:
    from stages import evaluate

    params = parse_params(tiny_raw(DPO_GRPO, evaluate=EVALUATE))
    layout = build_trained_input_project(params, tmp_path, "sft")
    evaluate.run(params, layout)
    report = json.loads(layout.metrics("eval").read_text())
    preference = report["models"]["sft"]["domains"]["add3"]["preference"]
    assert preference["n_pairs"] == 8
    accuracy = preference["accuracy"]
    assert 0.0 <= accuracy["ci_low"] <= accuracy["mean"] <= accuracy["ci_high"] <= 1.0 and accuracy["n"] == 8
    assert report["summary"]["sft.add3.preference_accuracy"] == round(accuracy["mean"], 6)
    assert "preference" not in report["models"]["sft"]["domains"]["add"]
    evaluate.run(params, layout)  # the same pairs again: the same scores
    assert (
        json.loads(layout.metrics("eval").read_text())["models"]["sft"]["domains"]["add3"]["preference"] == preference
    )
