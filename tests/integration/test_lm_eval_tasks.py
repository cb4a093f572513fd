"""lm-evaluation-harness on project tasks written from held-out records, run on a tiny local model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from posttrain.config import AdditionDomain, ArchitectureConfig, TokenizerConfig
from posttrain.data.domains import generate, make_record
from posttrain.errors import DataError
from posttrain.models import chat_template
from posttrain.models.build import build_scratch_model, save_model, train_tokenizer
from posttrain.scoring.lm_eval_tasks import TaskSpec, run, write_task

TINY = ArchitectureConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    items = generate("add", AdditionDomain(kind="addition", n_items=200, chat=True), seed=3)
    tokenizer = train_tokenizer(
        [r["text"] for r in items], TokenizerConfig(vocab_size=96, min_frequency=2), max_length=128
    )
    chat_template.install(tokenizer, "chatml", Path("."))
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_model(build_scratch_model(TINY, tokenizer), tokenizer, folder)
    return folder


def test_task_files_are_local_json(tmp_path: Path) -> None:
    records = generate("add", AdditionDomain(kind="addition", n_items=3, chat=True), seed=3)
    name = write_task(TaskSpec("add", "generate", records), tmp_path)
    config = json.loads((tmp_path / f"{name}.yaml").read_text())
    assert config["dataset_path"] == "json" and Path(config["dataset_kwargs"]["data_files"]["test"]).is_file()
    rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": r["prompt"], "answer": r["answer"]} for r in records]
    with pytest.raises(DataError, match=r"record .* has no answer to match"):
        write_task(TaskSpec("docs", "generate", [make_record("docs", text="a document")]), tmp_path)


def test_simple_evaluate_on_a_tiny_chat_model(tiny_chat_model: Path, tmp_path: Path) -> None:
    held_out = generate("add", AdditionDomain(kind="addition", n_items=12, chat=True), seed=4)
    probe = [make_record("chat", text=f"user: tell me about item {i}\nassistant: item {i} is fine") for i in range(6)]
    scores = run(
        tiny_chat_model,
        [TaskSpec("add", "generate", held_out, max_gen_toks=4), TaskSpec("chat_ppl", "perplexity", probe)],
        tmp_path / "tasks",
        chat=True,
        batch_size=4,
    )
    add, ppl = scores["add"], scores["chat_ppl"]
    assert add["n"] == 12 and 0.0 <= add["exact_match"] <= 1.0 and add["exact_match_stderr"] >= 0.0
    # An untrained model: perplexity is finite and far above 1; lm-eval has no stderr for it (NaN).
    assert ppl["n"] == 6 and 1.0 < ppl["word_perplexity"] < math.inf and math.isnan(ppl["word_perplexity_stderr"])
    assert ppl["bits_per_byte"] > 0
