"""The one tiny recipe, params and model for tests: `configs/tiny.yaml` through the library's builders.

Every test that needs params starts from `tiny_raw()` (the raw mapping, as read from a params file)
and states what it changes as overrides; models and tokenizers come from `posttrain.models.build`,
never from a hand-written config.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml

from posttrain.config import ArchitectureConfig, Params, parse_params
from posttrain.models.build import build_scratch_model

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "configs" / "tiny.yaml"


def deep_update(target: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into `target` (nested mappings merged, everything else replaced); returns `target`."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_update(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def tiny_raw(*presets: dict[str, Any], track: bool = False, **sections: dict[str, Any]) -> dict[str, Any]:
    """configs/tiny.yaml as a raw mapping, MLflow tracking off unless `track`, each section deep-updated:
    first by the `presets` (mappings of section overrides shared by a group of tests), then by `sections`.

    e.g. `tiny_raw(sft={"trainer": {"max_steps": 2}}, model={"architecture": {"num_hidden_layers": 1}})`.
    """
    raw = yaml.safe_load(TINY_YAML.read_text())
    raw["tracking"]["enabled"] = track
    for name, values in [item for preset in presets for item in preset.items()] + list(sections.items()):
        if isinstance(values, dict) and isinstance(raw.get(name), dict):
            deep_update(raw[name], values)
        else:
            raw[name] = copy.deepcopy(values)
    return raw


def tiny_params(*presets: dict[str, Any], track: bool = False, **sections: dict[str, Any]) -> Params:
    """`tiny_raw(...)`, validated."""
    return parse_params(tiny_raw(*presets, track=track, **sections))


# --------------------------------------------------------------------------- models without a project

ALPHABET = list("0123456789+-=:abcdefghijklmnopqrstuvwxyz")


def char_tokenizer() -> Any:
    """Character-level tokenizer over ALPHABET (vocabulary = alphabet + pad/eos/unk), for tests that need
    one fixed token per character, independent of any training data."""
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


def tiny_model(
    tokenizer: Any = None, *, hidden: int = 32, layers: int = 2, seed: int = 0, tie: bool = True
) -> tuple[torch.nn.Module, Any]:
    """A seeded scratch Llama from `posttrain.models.build.build_scratch_model` (4 heads, MLP 2x hidden)."""
    tokenizer = tokenizer or char_tokenizer()
    torch.manual_seed(seed)
    arch = ArchitectureConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return build_scratch_model(arch, tokenizer), tokenizer


def train_to_memorize(model: Any, tokenizer: Any, prompts: list[str], answers: list[str], steps: int = 300) -> None:
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


def save_tiny(folder: Path, model: Any, tokenizer: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- a BOS-requiring tokenizer

BOS_TEXTS = [f"{a}+{b}={a + b}" for a in range(30) for b in range(30)] + ["hello there", "what is the sum"]


def bos_tokenizer(template: str | None = "chatml") -> Any:
    """A scratch BPE tokenizer that puts `<s>` in front of every text on encode, as Llama/Mistral/Gemma
    tokenizers do (`model.tokenizer.bos`), with `template` installed (None: no chat template)."""
    from posttrain.config import TokenizerConfig
    from posttrain.models import chat_template
    from posttrain.models.build import train_tokenizer

    tokenizer = train_tokenizer(BOS_TEXTS, TokenizerConfig(vocab_size=96, min_frequency=2, bos=True), max_length=64)
    if template is not None:
        chat_template.install(tokenizer, template, REPO)
    return tokenizer
