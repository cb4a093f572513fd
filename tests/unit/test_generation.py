"""Batched generation: left padding, EOS stopping, determinism.

`build_tiny_model` / `train_to_memorize` are also used by the merge/evaluate tests (imported from
this module; pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model, train_to_memorize

from posttrain.scoring.generation import generate

PROMPTS = ["1+2=", "12+34=", "rev:abc=", "7-3=", "99+99=", "rev:hello=", "5=", "abcdefgh="]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(hidden=32, layers=2, seed=0)


def test_batched_left_padded_greedy_equals_one_by_one(tiny):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=8)
    single = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    # Odd batch sizes mix padding differently; the answer must not change.
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3) == batched
    assert all(len(c) == 1 for c in batched)
    # A random model must produce some non-empty text, or this test compares nothing.
    assert any(c[0] for c in batched)


def test_sampling_is_deterministic_with_seed_and_shapes(tiny):
    model, tokenizer = tiny
    state = torch.random.get_rng_state()
    first = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=5, do_sample=True, num_return_sequences=4, seed=7)
    # The caller's RNG stream is left as it was.
    assert torch.equal(state, torch.random.get_rng_state())
    again = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=5, do_sample=True, num_return_sequences=4, seed=7)
    other = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=5, do_sample=True, num_return_sequences=4, seed=8)
    assert first == again
    assert first != other
    assert [len(c) for c in first] == [4, 4, 4]
    # Training mode is restored for a caller inside a training loop (continual evaluation).
    model.train()
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2)
    assert model.training
    model.eval()


def test_stops_on_eos_and_strips_it():
    model, tokenizer = tiny_model(hidden=32, layers=2, seed=1)
    prompts = ["1+2=", "12+34=", "rev:abc=", "7-3="]
    answers = ["3", "46", "cba", "4"]
    train_to_memorize(model, tokenizer, prompts, answers, steps=150)
    out = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    assert out == [[a] for a in answers]


def test_empty_and_invalid():
    model, tokenizer = tiny_model(hidden=16, layers=1)
    assert generate(model, tokenizer, [], max_new_tokens=3) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, ["1="], max_new_tokens=0)
