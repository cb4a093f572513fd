"""Preference accuracy (posttrain.scoring.preference): chosen strictly more likely than rejected, on hand-built
examples: the arithmetic of the share, and a tiny model that has memorized the chosen answers."""

from __future__ import annotations

import pytest
from helpers.tiny import tiny_model, train_to_memorize

from posttrain.scoring.evaluation import EvalSettings, preference_entry
from posttrain.scoring.preference import offline_pairs, preference_accuracy, preference_margins


def test_share_of_positive_margins_ties_are_not_preferences() -> None:
    assert preference_accuracy([2.0, -1.0, 0.0, 0.5]) == 0.5
    assert preference_accuracy([-0.1]) == 0.0
    with pytest.raises(ValueError, match="no pairs"):
        preference_accuracy([])
    entry = preference_entry([1.0, 1.0, -1.0, 3.0], EvalSettings(bootstrap_samples=200))
    assert entry["accuracy"]["mean"] == 0.75 and entry["logp_margin"]["mean"] == 1.0
    assert entry["accuracy"]["ci_low"] <= 0.75 <= entry["accuracy"]["ci_high"]


def test_a_model_prefers_the_answers_it_learned() -> None:
    prompts = [f"{a}+{b}=" for a, b in ((12, 30), (25, 41), (33, 14), (50, 29))]
    answers = [str(eval(p[:-1])) for p in prompts]
    model, tokenizer = tiny_model(hidden=64)
    train_to_memorize(model, tokenizer, prompts, answers, steps=200)
    records = [
        {"id": p, "domain": "add", "prompt": p, "answer": a, "verifier": "exact"}
        for p, a in zip(prompts, answers, strict=True)
    ]
    pairs = offline_pairs(records, seed=0)  # rejected: a plausible wrong answer (carry error, digit slip)
    assert all(p["chosen"] == a and p["rejected"] != a for p, a in zip(pairs, answers, strict=True))
    assert preference_accuracy(preference_margins(model, tokenizer, pairs)) == 1.0
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    assert preference_accuracy(preference_margins(model, tokenizer, swapped)) == 0.0
    half = pairs[:2] + swapped[2:]
    assert preference_accuracy(preference_margins(model, tokenizer, half)) == 0.5
