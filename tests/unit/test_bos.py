"""The tokenizer's BOS exactly once on every path that turns the pipeline's text into token ids (issue 26),
on a tiny scratch tokenizer that adds `<s>` on encode (`model.tokenizer.bos`), and nothing changed for a
tokenizer that adds none. The paths inside TRL and lm-eval: tests/integration/test_bos_paths.py."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers.tiny import BOS_TEXTS, REPO, bos_tokenizer, tiny_model

from posttrain.config import ModelConfig, TokenizerConfig
from posttrain.models import build, chat_template
from posttrain.models.encoding import bos_id, encode, strip_bos
from posttrain.scoring.generation import chat_prompt, chat_record, encode_prompts
from posttrain.scoring.loss import token_losses
from posttrain.scoring.preference import completion_logps
from posttrain.training.hybrid import demonstrations
from posttrain.training.inputs import chat_texts

TURNS = [{"role": "user", "content": "12+3="}]
RECORD = {
    "messages": '[{"content":"12+3=","role":"user"}]',
    "completion": '[{"content":"15","role":"assistant"}]',
    "answer": "15",
    "prompt": "12+3=",
}


def _bos_count(ids: list[int], bos: int) -> int:
    return sum(1 for token in ids if token == bos)


def test_bos_id_asks_the_tokenizer_what_it_adds() -> None:
    tok = bos_tokenizer(template=None)
    assert bos_id(tok) == tok.convert_tokens_to_ids("<s>")
    plain = build.train_tokenizer(BOS_TEXTS, TokenizerConfig(vocab_size=96))
    assert plain.bos_token is None and bos_id(plain) is None
    # A tokenizer that names a BOS token but never adds it (SmolLM2 names <|im_start|>): none.
    plain.bos_token = "</s>"
    assert bos_id(plain) is None and strip_bos(plain, "</s>12") == "</s>12"


def test_encode_puts_the_bos_in_front_once() -> None:
    tok = bos_tokenizer(template=None)
    bos = bos_id(tok)
    for ids in encode(tok, ["12+3=", "<s>12+3=", "hello there"]):
        assert ids[0] == bos and _bos_count(ids, bos) == 1
    assert encode(tok, ["12+3="])[0][1:] == tok("12+3=", add_special_tokens=False)["input_ids"]


def test_builtin_template_renders_the_bos_where_the_tokenizer_adds_one() -> None:
    tok = bos_tokenizer()
    bos = bos_id(tok)
    assert tok.chat_template == chat_template.BOS_PREFIX + chat_template.CHATML
    # TRL's SFT path: apply_chat_template(tokenize=True) adds no special tokens; the template renders the BOS.
    conversation = [*TURNS, {"role": "assistant", "content": "15"}]
    ids = tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == bos and _bos_count(ids, bos) == 1
    # A tokenizer that adds no BOS keeps the template as it was (fingerprints of existing models unchanged).
    plain = build.train_tokenizer(BOS_TEXTS, TokenizerConfig(vocab_size=96))
    chat_template.install(plain, "chatml", REPO)
    assert plain.chat_template == chat_template.CHATML


def test_a_template_without_bos_gets_one_and_one_with_it_is_kept(tmp_path: Path) -> None:
    (tmp_path / "bare.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "own.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = bos_tokenizer(template=None)
    chat_template.install(tok, "bare.jinja", tmp_path)
    assert tok.chat_template.startswith(chat_template.BOS_PREFIX)
    chat_template.install(tok, "own.jinja", tmp_path)
    assert tok.chat_template == (tmp_path / "own.jinja").read_text()


def test_pipeline_strings_are_bos_free_and_every_encoding_has_it_once() -> None:
    tok = bos_tokenizer()
    bos = bos_id(tok)
    prompt = chat_prompt(tok, TURNS)
    record = chat_record(tok, RECORD)
    texts = [
        prompt,
        record["prompt"],
        record["text"],
        *chat_texts(tok, [[*TURNS, {"role": "assistant", "content": "1"}]], "t"),
    ]
    assert not any(t.startswith("<s>") for t in texts)
    for ids in encode_prompts(tok, texts):
        assert ids[0] == bos and _bos_count(ids, bos) == 1
    batch = demonstrations(tok, [prompt], ["15"])
    row = batch["sft_input_ids"][0].tolist()
    assert row[0] == bos and _bos_count(row, bos) == 1


def test_token_loss_and_dpo_logps_condition_on_the_bos() -> None:
    tok = bos_tokenizer()
    model, _ = tiny_model(tok)
    text = chat_record(tok, RECORD)["text"]
    sums, counts = token_losses(model, tok, [text], batch_size=4)
    ids = [bos_id(tok), *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert counts == [len(ids) - 1]  # every token but the BOS is predicted
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    manual = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")
    assert abs(sums[0] - float(manual)) < 1e-4
    # DPO margins: the completion is scored after prompt ids that start with the one BOS.
    prompt = chat_prompt(tok, TURNS)
    full = [bos_id(tok), *tok(prompt + "15" + tok.eos_token, add_special_tokens=False)["input_ids"]]
    start = len(encode(tok, [prompt])[0])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0, :-1], dim=-1)
    expected = sum(float(logps[i - 1, full[i]]) for i in range(start, len(full)))
    assert abs(completion_logps(model, tok, [prompt], ["15"])[0] - expected) < 1e-4


def test_added_template_tokens_start_at_the_mean_embedding() -> None:
    tok = build.train_tokenizer(BOS_TEXTS, TokenizerConfig(vocab_size=96, bos=True))
    for tie in (True, False):
        model, _ = tiny_model(tok, tie=tie)
        old = model.get_input_embeddings().weight.detach().clone()
        head = model.get_output_embeddings().weight.detach().clone()
        fresh = build.train_tokenizer(BOS_TEXTS, TokenizerConfig(vocab_size=96, bos=True))
        build.install_template(model, fresh, ModelConfig(chat_template="chatml"), REPO)
        rows = model.get_input_embeddings().weight.detach()
        assert rows.shape[0] == len(fresh) == old.shape[0] + 2
        assert torch.equal(rows[: old.shape[0]], old)
        assert torch.allclose(rows[old.shape[0] :], old.mean(dim=0).expand(2, -1))
        out = model.get_output_embeddings().weight.detach()
        assert torch.allclose(out[old.shape[0] :], head.mean(dim=0).expand(2, -1))
        assert model.config.bos_token_id == bos_id(fresh)
