"""Batched generation: left padding, EOS stopping, determinism.

`build_tiny_model` / `train_to_memorize` are also used by the merge/evaluate tests (imported from
this module; pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.scoring.generation import generate

ALPHABET = list("0123456789+-=:abcdefghijklmnopqrstuvwxyz")


def build_tokenizer():
    """Character-level BPE tokenizer trained with `tokenizers` (no merges: vocab = alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    specials = ["<pad>", "<eos>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=len(ALPHABET) + len(specials), special_tokens=specials, initial_alphabet=ALPHABET
    )
    tok.train_from_iterator(["".join(ALPHABET)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def build_tiny_model(
    tokenizer=None, *, hidden: int = 32, layers: int = 2, seed: int = 0, tie: bool = True
) -> tuple[torch.nn.Module, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config), tokenizer


def train_to_memorize(model, tokenizer, prompts: list[str], answers: list[str], steps: int = 300) -> None:
    """A few hundred Adam steps on prompt+answer+EOS: enough for a tiny model to memorize ~16 items."""
    rows = [tokenizer(p + a)["input_ids"] + [tokenizer.eos_token_id] for p, a in zip(prompts, answers, strict=True)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def save_tiny(folder: Path, model, tokenizer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


PROMPTS = ["1+2=", "12+34=", "rev:abc=", "7-3=", "99+99=", "rev:hello=", "5=", "abcdefgh="]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(hidden=32, layers=2, seed=0)


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
    model, tokenizer = build_tiny_model(hidden=32, layers=2, seed=1)
    prompts = ["1+2=", "12+34=", "rev:abc=", "7-3="]
    answers = ["3", "46", "cba", "4"]
    train_to_memorize(model, tokenizer, prompts, answers, steps=150)
    out = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    assert out == [[a] for a in answers]


def test_empty_and_invalid():
    model, tokenizer = build_tiny_model(hidden=16, layers=1)
    assert generate(model, tokenizer, [], max_new_tokens=3) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, ["1="], max_new_tokens=0)
