"""Chat template: choice, installation on a scratch tokenizer, assistant-only mask, fingerprint check."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.config import ParamsError, TokenizerConfig
from posttrain.errors import StageError
from posttrain.models import chat_template
from posttrain.models.build import train_tokenizer

TEXTS = [f"{a}+{b}={a + b}" for a in range(30) for b in range(30)] + ["hello there", "what is the sum"]
CONVERSATION = [
    {"role": "system", "content": "Add."},
    {"role": "user", "content": "12+30="},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "1+2="},
    {"role": "assistant", "content": "3"},
]


@pytest.fixture
def tokenizer():
    tok = train_tokenizer(TEXTS, TokenizerConfig(vocab_size=96, min_frequency=2), max_length=64)
    added = chat_template.install(tok, "chatml", Path("."))
    assert added == 2 and tok.eos_token == "<|im_end|>"
    return tok


def test_template_tokens_are_single_special_tokens(tokenizer) -> None:
    for token in ("<|im_start|>", "<|im_end|>"):
        assert tokenizer.tokenize(f"a{token}b").count(token) == 1
    text = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n12+30=<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_mask_is_the_assistant_tokens_and_their_end_of_turn(tokenizer) -> None:
    out = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = tokenizer("42", add_special_tokens=False)["input_ids"] + [end]
    expected += tokenizer("3", add_special_tokens=False)["input_ids"] + [end]
    assert masked == expected
    # The masked spans are contiguous runs that each end on the end-of-turn token.
    runs, run = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    assert len(runs) == 2 and all(r[-1] == end for r in runs)


def test_trl_accepts_the_builtin_template(tokenizer) -> None:
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)


def test_choice_base_and_file(tmp_path: Path, tokenizer) -> None:
    assert chat_template.template_text("base", tokenizer, tmp_path) == chat_template.CHATML
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert chat_template.template_text("t.jinja", None, tmp_path) == "{{ messages[0]['content'] }}"
    with pytest.raises(ParamsError, match=r"model.chat_template = 'nope.jinja': no such file"):
        chat_template.template_text("nope.jinja", None, tmp_path)
    bare = train_tokenizer(TEXTS, TokenizerConfig(vocab_size=96, min_frequency=2), max_length=64)
    with pytest.raises(ParamsError, match=r"'base': the base model's tokenizer has no chat template"):
        chat_template.template_text("base", bare, tmp_path)


def test_fingerprint_changes_with_text_or_token_ids_and_mismatch_is_refused(tmp_path: Path, tokenizer) -> None:
    first = chat_template.fingerprint(tokenizer)
    assert first == chat_template.fingerprint(tokenizer) and len(first) == 64
    other = train_tokenizer(TEXTS, TokenizerConfig(vocab_size=96, min_frequency=2), max_length=64)
    other.add_special_tokens({"additional_special_tokens": ["<x>"]})  # shifts the template tokens' ids
    chat_template.install(other, "chatml", tmp_path)
    assert chat_template.fingerprint(other) != first
    tokenizer.chat_template = chat_template.CHATML.replace("assistant", "bot")
    changed = chat_template.fingerprint(tokenizer)
    assert changed != first
    chat_template.check_same_template(first, first, child_name="dpo", parent_name="sft")
    with pytest.raises(StageError, match=rf"dpo has fingerprint {changed[:16]}.*parent sft has {first[:16]}"):
        chat_template.check_same_template(changed, first, child_name="dpo", parent_name="sft")


def test_trl_sft_on_a_conversational_mixture_trains_only_assistant_tokens(tmp_path: Path, tokenizer) -> None:
    """A `conversational` mixture of a `chat: true` domain through TRL's SFTTrainer with
    assistant_only_loss: the unmasked labels are exactly each answer and its <|im_end|>."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from posttrain.config import AdditionDomain, ArchitectureConfig, MixtureConfig
    from posttrain.data.domains import generate
    from posttrain.data.formats import decode_messages
    from posttrain.data.mixing import build_mixture
    from posttrain.models.build import build_scratch_model

    items = {"add": generate("add", AdditionDomain(kind="addition", n_items=40, chat=True), seed=2)}
    mixture = build_mixture("sft", MixtureConfig(weights={"add": 1.0}, total=8, format="conversational"), items)
    dataset = datasets.Dataset.from_list([{"messages": decode_messages(r["messages"])} for r in mixture.rows])
    arch = ArchitectureConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    config = SFTConfig(
        output_dir=str(tmp_path / "out"),
        assistant_only_loss=True,
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        max_length=64,
    )
    trainer = SFTTrainer(
        model=build_scratch_model(arch, tokenizer), args=config, train_dataset=dataset, processing_class=tokenizer
    )
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for index in range(4):
        batch = trainer.data_collator([trainer.train_dataset[index]])
        labels = [t for t in batch["labels"][0].tolist() if t != -100]
        answer = decode_messages(mixture.rows[index]["messages"])[-1]["content"]
        assert labels == tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
    assert trainer.train().global_step == 2


def test_folders_with_different_templates_are_refused(tmp_path: Path, tokenizer) -> None:
    tokenizer.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "dpo")
    assert chat_template.check_folders(tmp_path / "dpo", tmp_path / "sft") == chat_template.fingerprint(tokenizer)
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    tokenizer.save_pretrained(tmp_path / "dpo")
    with pytest.raises(StageError, match=r"chat template mismatch: .*dpo has fingerprint .* parent .*sft has"):
        chat_template.check_folders(tmp_path / "dpo", tmp_path / "sft")
