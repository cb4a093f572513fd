"""Model and tokenizer factory: scratch build, digit tokens, from_pretrained of a local folder,
tokenizer/model mismatches and corrupted files caught at load time."""

from __future__ import annotations

import json

import pytest

from posttrain.config import ArchitectureConfig, ModelConfig, TokenizerConfig
from posttrain.errors import StageError
from posttrain.lineage import write_lineage
from posttrain.models.build import (
    build_scratch_model,
    check_tokenizer_fits,
    count_parameters,
    load_base,
    save_model,
    train_tokenizer,
)
from posttrain.models.loading import load_stage_model

TINY = ArchitectureConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
TEXTS = (
    [f"{a}+{b}={a + b}" for a in range(10, 60) for b in range(10, 60, 7)]
    + [f"rev:{w}={w[::-1]}" for w in ("abc", "hello", "world", "cab", "bead", "deed")]
    + ["a plain sentence with spaces", "another plain sentence"]
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, TokenizerConfig(vocab_size=64, min_frequency=2), max_length=32)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import: set the variable and the parsed constant.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


def test_tokenizer_digits_are_single_tokens_and_decode_exactly(tokenizer):
    assert tokenizer.tokenize("12+34=46") == ["1", "2", "+", "3", "4", "=", "4", "6"]
    for text in ("rev:hello=olleh", "a plain sentence with spaces", "987+123=1110"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # The prompt is a token prefix of prompt + answer: the completion starts on a token boundary.
    prompt = tokenizer("rev:hello=")["input_ids"]
    assert tokenizer("rev:hello=olleh")["input_ids"][: len(prompt)] == prompt


def test_tokenizer_specials_and_vocab_size(tokenizer):
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    assert None not in ids and len(ids) == 3
    assert len(tokenizer) <= 64
    # No special tokens are added around plain text (the EOS is appended by the trainer).
    assert tokenizer.eos_token_id not in tokenizer("12+34=46")["input_ids"]


def test_scratch_model_default_size_is_about_one_million(tokenizer):
    model = build_scratch_model(ArchitectureConfig(), tokenizer)
    assert 0.9e6 < count_parameters(model) < 1.3e6
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_save_and_load_stage_model_round_trip(tmp_path, tokenizer):
    import torch

    model = build_scratch_model(TINY, tokenizer)
    folder = tmp_path / "m"
    folder.mkdir()
    save_model(model, tokenizer, folder)
    write_lineage(folder, stage="pretrain", root=tmp_path, parents=[], params={}, params_hash="x", seed=0)
    assert (folder / "model.safetensors").is_file() and (folder / "generation_config.json").is_file()
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    loaded = load_stage_model(folder)
    assert loaded.lineage["stage"] == "pretrain"
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)


def test_load_base_from_local_folder(tmp_path, tokenizer):
    folder = tmp_path / "base"
    save_model(build_scratch_model(TINY, tokenizer), tokenizer, folder)
    loaded = load_base(ModelConfig(base=str(folder)))
    assert loaded.path == folder
    assert loaded.tokenizer.tokenize("12+3=") == ["1", "2", "+", "3", "="]
    assert count_parameters(loaded.model) == count_parameters(build_scratch_model(TINY, tokenizer))


def test_load_base_unknown_hub_id_fails_offline():
    with pytest.raises(StageError, match="model.base 'no-such-org/no-such-model'"):
        load_base(ModelConfig(base="no-such-org/no-such-model"))


def test_tokenizer_larger_than_embedding_is_refused(tokenizer):
    small = TokenizerConfig(vocab_size=40, min_frequency=2)
    model = build_scratch_model(TINY, train_tokenizer(TEXTS, small))
    rows = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(StageError) as error:
        check_tokenizer_fits(model, tokenizer, where="test")
    assert f"{len(tokenizer)} tokens" in str(error.value) and f"{rows} rows" in str(error.value)


def test_eos_mismatch_is_refused_with_both_ids(tokenizer):
    model = build_scratch_model(TINY, tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id + 5
    with pytest.raises(StageError, match=rf"eos_token_id is {tokenizer.eos_token_id} but the model's eos_token_id is {tokenizer.eos_token_id + 5}"):  # fmt: skip
        check_tokenizer_fits(model, tokenizer, where="test")


def test_corrupted_byte_is_detected_by_hash(tmp_path, tokenizer):
    folder = tmp_path / "m"
    folder.mkdir()
    save_model(build_scratch_model(TINY, tokenizer), tokenizer, folder)
    record = write_lineage(folder, stage="cpt", root=tmp_path, parents=[], params={}, params_hash="x", seed=0)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-10] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(StageError) as error:
        load_stage_model(folder)
    message = str(error.value)
    assert "model.safetensors" in message and record["files"]["model.safetensors"] in message


def test_saved_folder_does_not_depend_on_offline_mode(tmp_path, tokenizer):
    """A model re-saved after loading offline (HF_HUB_OFFLINE=1: local_files_only) or online has the same files."""
    from transformers import AutoTokenizer

    model = build_scratch_model(TINY, tokenizer)
    first = tmp_path / "first"
    save_model(model, tokenizer, first)
    configs = []
    for offline in (True, False):
        loaded = AutoTokenizer.from_pretrained(first, local_files_only=offline)
        again = tmp_path / f"again-{offline}"
        save_model(model, loaded, again)
        configs.append((again / "tokenizer_config.json").read_text())
    assert configs[0] == configs[1]
    assert "local_files_only" not in json.loads(configs[0])
