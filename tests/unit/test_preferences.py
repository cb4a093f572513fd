"""On-policy DPO pair construction: chosen verified right, rejected verified wrong, fallbacks counted."""

from __future__ import annotations

import random
from typing import Any

import pytest

from posttrain.config import ArchitectureConfig, TokenizerConfig
from posttrain.data.domains import make_record, wrong_answer
from posttrain.data.verifiers import VERIFIERS, exact_match
from posttrain.errors import DataError
from posttrain.training.preferences import PairCounts, build_on_policy_pairs, pair_from_samples


@pytest.fixture(scope="module")
def tiny_model() -> tuple[Any, Any]:
    """An untrained ~20k-parameter Llama and a BPE tokenizer trained on sums (real sampling, no stubs)."""
    import torch

    from posttrain.models.build import build_scratch_model, train_tokenizer

    texts = [f"{a}+{b}={a + b}" for a in range(40) for b in range(40)]
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=40, min_frequency=1))
    torch.manual_seed(0)
    arch = ArchitectureConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    )
    return build_scratch_model(arch, tokenizer), tokenizer


def preference_rows(n: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        record = make_record("add", prompt=f"{i}+{i}=", answer=str(2 * i), verifier="exact")
        rows.append({**record, "chosen": record["answer"], "rejected": wrong_answer(record, rng)})
    return rows


def test_pair_from_samples_picks_verified_sides() -> None:
    samples = ["46 12", "45", "47", "45", "46", " 46"]
    assert pair_from_samples(samples, "46", exact_match) == ("46", "45")  # shortest right, commonest wrong
    assert pair_from_samples(["46", "46 "], "46", exact_match) is None  # all right
    assert pair_from_samples(["1", "2"], "46", exact_match) is None  # all wrong


def test_on_policy_pairs_with_real_sampling(tiny_model, monkeypatch) -> None:
    model, tokenizer = tiny_model
    # An untrained model almost never writes a right sum, so the "right" set is made by a verifier
    # (even-length sample) that splits its real samples; the pairing logic is the unit under test.
    monkeypatch.setitem(VERIFIERS, "even_length", lambda completion, answer: len(completion.strip()) % 2 == 0)
    rows = preference_rows(12)
    for row in rows[:8]:
        row["verifier"] = "even_length"
    pairs, counts = build_on_policy_pairs(model, tokenizer, rows, samples=6, max_new_tokens=4, seed=1)

    assert len(pairs) == len(rows) and [p["id"] for p in pairs] == [r["id"] for r in rows]
    assert counts.on_policy + counts.offline == len(rows)
    assert counts.samples == 6 * len(rows)
    assert counts.on_policy >= 1, counts
    for pair, row in zip(pairs, rows, strict=True):
        verify = VERIFIERS[row["verifier"]]
        if (pair["chosen"], pair["rejected"]) == (row["chosen"], row["rejected"]):
            continue  # offline fallback: the mixture's own pair
        assert verify(pair["chosen"], row["answer"]) and not verify(pair["rejected"], row["answer"])
    # The last rows use the real exact-match verifier: an untrained model gets every sample wrong,
    # so each falls back to the offline pair (chosen = answer, rejected = the data layer's wrong answer).
    for pair, row in zip(pairs[8:], rows[8:], strict=True):
        assert pair["chosen"] == row["answer"] and pair["rejected"] == row["rejected"]
        assert not exact_match(pair["rejected"], row["answer"])
    assert counts.offline_all_wrong >= 4

    again, counts_again = build_on_policy_pairs(model, tokenizer, rows, samples=6, max_new_tokens=4, seed=1)
    assert again == pairs and counts_again == counts  # seeded: reproducible


def test_all_correct_falls_back_and_is_counted(tiny_model, monkeypatch) -> None:
    model, tokenizer = tiny_model
    monkeypatch.setitem(VERIFIERS, "anything", lambda completion, answer: True)
    rows = [{**row, "verifier": "anything"} for row in preference_rows(3)]
    pairs, counts = build_on_policy_pairs(model, tokenizer, rows, samples=2, max_new_tokens=2, seed=0)
    assert counts == PairCounts(on_policy=0, offline_all_correct=3, offline_all_wrong=0, samples=6, correct_samples=6)
    assert counts.as_dict()["offline"] == 3 and counts.as_dict()["on_policy_fraction"] == 0.0
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(r["chosen"], r["rejected"]) for r in rows]


def test_bad_rows_are_refused(tiny_model) -> None:
    model, tokenizer = tiny_model
    rows = preference_rows(2)
    with pytest.raises(DataError, match="lack column"):
        build_on_policy_pairs(model, tokenizer, [{"prompt": "1+1="}], samples=2, max_new_tokens=2)
    with pytest.raises(DataError, match="verifier 'nope' is not registered"):
        build_on_policy_pairs(model, tokenizer, [{**rows[0], "verifier": "nope"}], samples=2, max_new_tokens=2)
