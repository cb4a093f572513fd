"""Evaluation statistics, pluggable answerers (oracle / broken model) and the report schema."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from helpers.tiny import tiny_model

from posttrain.data.verifiers import VERIFIERS
from posttrain.scoring import evaluation
from posttrain.scoring.evaluation import EvalSettings, ModelAnswerer, evaluate_domain, pass_at_k


def test_pass_at_k_known_values():
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)  # 1 - C(7,4)/C(10,4)
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)  # 1 - C(6,4)/C(8,4)
    assert pass_at_k(8, 5, 4) == 1.0  # fewer than k wrong samples: some k-subset is all right
    assert pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_bootstrap_ci_covers_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    true_p, trials, covered = 0.3, 200, 0
    for trial in range(trials):
        x = (rng.random(120) < true_p).astype(float)
        ci = evaluation.mean_ci(x, samples=400, confidence=0.95, seed=trial)
        covered += ci["ci_low"] <= true_p <= ci["ci_high"]
        assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"]
    # Percentile bootstrap of a proportion: close to 95%, slightly under for n=120.
    assert 0.88 <= covered / trials <= 0.99
    # A narrower confidence gives a narrower interval.
    x = (rng.random(120) < true_p).astype(float)
    wide = evaluation.mean_ci(x, samples=400, confidence=0.95, seed=1)
    narrow = evaluation.mean_ci(x, samples=400, confidence=0.5, seed=1)
    assert narrow["ci_high"] - narrow["ci_low"] < wide["ci_high"] - wide["ci_low"]


def test_forgetting_is_best_earlier_minus_current_with_paired_ci():
    vectors = {
        "a": np.array([1.0, 1.0, 1.0, 0.0]),
        "b": np.array([1.0, 0.0, 0.0, 0.0]),
        "c": np.array([1.0, 1.0, 0.0, 0.0]),
    }
    f = evaluation.forgetting(vectors, ["a", "b", "c"], samples=300, confidence=0.95, seed=0)
    assert f["a"] is None
    assert f["b"]["value"] == pytest.approx(0.5) and f["b"]["best_earlier_stage"] == "a"
    assert f["c"]["value"] == pytest.approx(0.25) and f["c"]["best_earlier_stage"] == "a"
    for stage in ("b", "c"):
        assert f[stage]["ci_low"] <= f[stage]["value"] <= f[stage]["ci_high"]
    # Paired: a stage identical to its predecessor has exactly zero forgetting in every resample.
    same = evaluation.forgetting(
        {"a": vectors["a"], "b": vectors["a"].copy()}, ["a", "b"], samples=200, confidence=0.95, seed=0
    )
    assert (same["b"]["value"], same["b"]["ci_low"], same["b"]["ci_high"]) == (0.0, 0.0, 0.0)


def addition_items(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(10, 100, size=2))
        prompt, answer = f"{a}+{b}=", str(a + b)
        rows.append(
            {
                "id": prompt,
                "domain": "add",
                "prompt": prompt,
                "answer": answer,
                "text": prompt + answer,
                "verifier": "exact",
            }
        )
    return pd.DataFrame(rows)


class Oracle:
    """Answers every prompt correctly: the scoring path must give it 100%."""

    def __init__(self, items: pd.DataFrame, right_samples: int | None = None) -> None:
        self.answers = dict(zip(items["prompt"], items["answer"], strict=True))
        self.right_samples = right_samples

    def greedy(self, prompts: list[str]) -> list[str]:
        return [self.answers[p] for p in prompts]

    def sample(self, prompts: list[str], n: int, *, temperature: float, seed: int) -> list[list[str]]:
        right = n if self.right_samples is None else self.right_samples
        return [[self.answers[p]] * right + ["wrong"] * (n - right) for p in prompts]

    def token_losses(self, texts: list[str]) -> None:
        return None


SETTINGS = EvalSettings(bootstrap_samples=200, pass_n=4, pass_k=(1, 2), pass_max_items=20)


def test_oracle_scores_100_percent():
    items = addition_items(40)
    entry, per_item = evaluate_domain(Oracle(items), items, VERIFIERS, SETTINGS)
    assert entry["exact_match"] == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 40}
    assert entry["pass_at_k"]["1"]["mean"] == 1.0 and entry["pass_at_k"]["2"]["mean"] == 1.0
    assert entry["pass_at_k"]["1"]["n"] == 20  # pass_max_items
    assert entry["loss"] is None and entry["perplexity"] is None
    assert per_item["exact_match"].shape == (40,)


def test_pass_at_k_through_the_scoring_path():
    items = addition_items(10)
    entry, _ = evaluate_domain(Oracle(items, right_samples=1), items, VERIFIERS, SETTINGS)
    # n=4 samples, c=1 right: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2
    assert entry["pass_at_k"]["1"]["mean"] == pytest.approx(0.25)
    assert entry["pass_at_k"]["2"]["mean"] == pytest.approx(0.5)


def test_broken_model_scores_near_zero_through_the_same_path():
    items = addition_items(40)
    model, tokenizer = tiny_model(hidden=32, layers=2, seed=3)
    answerer = ModelAnswerer(model, tokenizer, max_new_tokens=4, batch_size=16)
    entry, _ = evaluate_domain(answerer, items, VERIFIERS, SETTINGS)
    assert entry["exact_match"]["mean"] <= 0.05
    assert entry["exact_match"]["ci_low"] <= entry["exact_match"]["mean"] <= entry["exact_match"]["ci_high"]
    # An untrained model is close to uniform over the vocabulary: loss near log(|V|).
    assert entry["loss"]["mean"] == pytest.approx(math.log(len(tokenizer)), rel=0.15)
    assert entry["perplexity"]["mean"] == pytest.approx(math.exp(entry["loss"]["mean"]))
    # Predicted tokens: every char token after the first, plus EOS.
    assert entry["loss"]["tokens"] == sum(len(t) for t in items["text"])
    assert set(entry["seconds"]) == {"greedy", "pass_at_k", "loss", "total"}


def test_token_losses_are_per_item_and_independent_of_batching():
    model, tokenizer = tiny_model(hidden=32, layers=2, seed=4)
    texts = ["1+2=3", "12+34=46", "rev:abcdef=fedcba"]
    full = ModelAnswerer(model, tokenizer, batch_size=3).token_losses(texts)
    one = ModelAnswerer(model, tokenizer, batch_size=1).token_losses(texts)
    assert np.allclose(full[0], one[0], atol=1e-4) and full[1] == one[1] == [5, 8, 17]


def test_unknown_verifier_is_a_data_error():
    from posttrain.errors import DataError

    items = addition_items(3).assign(verifier="nope")
    with pytest.raises(DataError, match="nope"):
        evaluate_domain(Oracle(items), items, VERIFIERS, SETTINGS)


def test_report_schema_summary_and_forgetting():
    items = addition_items(30)
    results, per_item = {}, {}
    for stage, right in (("sft", None), ("grpo", 0)):
        oracle = Oracle(items, right_samples=right)
        if right == 0:
            oracle.greedy = lambda prompts: ["0"] * len(prompts)  # forgets everything
        entry, vec = evaluate_domain(oracle, items, VERIFIERS, SETTINGS)
        results[stage], per_item[stage] = {"add": entry}, {"add": vec}
    report = evaluation.build_report(results, per_item, ["sft", "grpo"], ["add"], SETTINGS, config={"confidence": 0.95})
    assert report["schema_version"] == 1 and report["stages"] == ["sft", "grpo"]
    assert report["forgetting"]["scores"] == {"sft": {"add": 1.0}, "grpo": {"add": 0.0}}
    f = report["forgetting"]["forgetting"]["grpo"]["add"]
    assert f["value"] == 1.0 and f["best_earlier_stage"] == "sft"
    assert report["forgetting"]["worst"]["add"]["stage"] == "grpo"
    assert report["models"]["grpo"]["forgetting"]["add"]["value"] == 1.0 and report["models"]["sft"]["forgetting"] == {}
    summary = report["summary"]
    assert summary["sft.add.exact_match"] == 1.0 and summary["grpo.add.forgetting"] == 1.0
    assert all(isinstance(v, float) for v in summary.values())


def test_stability_gap_files_exist_without_any_series(tmp_path):
    # dvc.yaml declares these plots: a recipe with continual evaluation off must still write them.
    from posttrain.scoring.plots import plot_stability_gap

    written = plot_stability_gap({}, ["pretrain", "cpt"], tmp_path)
    assert {p.name for p in written} == {"stability_gap.png", "stability_gap.csv"}
    assert (tmp_path / "stability_gap.csv").read_text().splitlines() == [
        "stage,step,pipeline_step,domain,loss,exact_match"
    ]
