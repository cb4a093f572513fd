"""The tokenizer's BOS exactly once where TRL's trainers and lm-evaluation-harness tokenize the pipeline's
text (issue 26), on a tiny model whose tokenizer adds `<s>` on encode (`model.tokenizer.bos`): SFT on
conversations (both TRL forms) and on plain text, DPO's string pairs, GRPO's string prompts, and lm-eval's
generation and perplexity requests with the settings `posttrain.scoring.lm_eval_tasks` gives it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers.tiny import bos_tokenizer, save_tiny, tiny_model

from posttrain.data.formats import chat_fields, decode_messages
from posttrain.models.encoding import bos_id
from posttrain.scoring.generation import chat_prompt, chat_record
from posttrain.scoring.lm_eval_tasks import model_args
from posttrain.training.inputs import chat_mixture_row

QUESTIONS = [(f"{a}+{b}=", str(a + b)) for a, b in ((12, 3), (20, 7), (5, 11), (9, 9))]
TRL_ARGS = {"max_steps": 1, "per_device_train_batch_size": 2, "use_cpu": True, "bf16": False, "report_to": [],
            "save_strategy": "no", "activation_checkpointing": False, "max_length": 64}  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> Any:
    return bos_tokenizer()


def _once(rows: list[list[int]], bos: int) -> None:
    for ids in rows:
        assert list(ids)[0] == bos and list(ids).count(bos) == 1, ids


def _conversation(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_sft_sees_one_bos_in_every_data_form(tmp_path: Path, tok: Any) -> None:
    import datasets
    from trl import SFTConfig, SFTTrainer

    forms = {
        "conversational": [{"messages": _conversation(q, a)} for q, a in QUESTIONS],
        "conversational prompt-completion": [
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in QUESTIONS
        ],
        "text (cpt)": [{"text": q + a} for q, a in QUESTIONS],
        "prompt-completion": [{"prompt": q, "completion": a} for q, a in QUESTIONS],
    }
    for name, rows in forms.items():
        model, _ = tiny_model(tok)
        chat = "messages" in rows[0]
        config = SFTConfig(output_dir=str(tmp_path / "sft"), assistant_only_loss=chat, **TRL_ARGS)
        trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)  # fmt: skip
        try:
            _once(trainer.train_dataset["input_ids"], bos_id(tok))
        except AssertionError as error:
            raise AssertionError(f"SFT form {name!r}: {error}") from None


def _chat_rows(tok: Any) -> list[dict[str, str]]:
    rows = []
    for q, a in QUESTIONS:
        fields = chat_fields(q, a)
        rows.append({"id": q, "prompt": fields["messages"], "chosen": fields["completion"],
                     "rejected": fields["completion"].replace(a, a + "0")})  # fmt: skip
    return [chat_mixture_row(tok, row, "test") for row in rows]


def test_dpo_string_pairs_get_one_bos(tmp_path: Path, tok: Any) -> None:
    import datasets
    from trl import DPOConfig, DPOTrainer

    rows = _chat_rows(tok)
    (model, _), (reference, _) = tiny_model(tok), tiny_model(tok)
    dataset = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = DPOTrainer(model=model, ref_model=reference, args=DPOConfig(output_dir=str(tmp_path / "dpo"), **TRL_ARGS),
                         train_dataset=dataset, processing_class=tok)  # fmt: skip
    data = trainer.train_dataset
    bos = bos_id(tok)
    _once(data["prompt_ids"], bos)
    assert all(bos not in ids for column in ("chosen_ids", "rejected_ids") for ids in data[column])


def test_grpo_string_prompts_get_one_bos(tmp_path: Path, tok: Any) -> None:
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    prompts = [chat_prompt(tok, [{"role": "user", "content": q}]) for q, _ in QUESTIONS]
    model, _ = tiny_model(tok)
    args = {k: v for k, v in TRL_ARGS.items() if k != "max_length"}
    config = GRPOConfig(output_dir=str(tmp_path / "grpo"), num_generations=2, max_completion_length=4, **args)
    trainer = GRPOTrainer(model=model, args=config, processing_class=tok, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]))  # fmt: skip
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)  # what GRPO generates from
    _once(prompt_ids, bos_id(tok))


def test_lm_eval_requests_get_one_bos(tmp_path: Path, tok: Any) -> None:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import get_rolling_token_windows

    model, _ = tiny_model(tok)
    folder = save_tiny(tmp_path / "model", model, tok)
    bos = bos_id(tok)
    generate = HFLM(**model_args(folder, "generate"), batch_size=2)
    chat = generate.apply_chat_template([{"role": "user", "content": "12+3="}], add_generation_prompt=True)
    for text in (chat, "12+3="):  # with the chat template (apply_chat_template: true) and without
        ids, _ = generate.tok_batch_encode([text])
        _once(ids.tolist(), bos)
    perplexity = HFLM(**model_args(folder, "perplexity"), batch_size=2)
    text = chat_record(
        tok, {"messages": '[{"content":"1+2=","role":"user"}]', "completion": '[{"content":"3","role":"assistant"}]'}
    )["text"]
    first_input, _ = next(get_rolling_token_windows(perplexity.tok_encode(text), perplexity.prefix_token_id, 64, 1))
    _once([first_input], bos)
    assert decode_messages('[{"content":"3","role":"assistant"}]')  # the record above is a real conversation
