"""Mixing: exact counts, temperature, replay, formats; the prepare and mix stages run in-process."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from posttrain import io
from posttrain.config import AdditionDomain, MixtureConfig, ReverseDomain, SubtractionDomain, parse_params
from posttrain.data.domains import RECORD_COLUMNS, generate, make_record
from posttrain.data.mixing import FORMAT_COLUMNS, allocate, build_mixture, stage_order, tempered_proportions
from posttrain.data.splits import split_of
from posttrain.data.verifiers import VERIFIERS
from posttrain.errors import DataError
from posttrain.layout import Layout


@pytest.fixture(scope="module")
def train() -> dict[str, list[dict[str, str]]]:
    return {
        "add": generate("add", AdditionDomain(kind="addition", digits=2, n_items=300), seed=0),
        "sub": generate("sub", SubtractionDomain(kind="subtraction", digits=2, n_items=300), seed=0),
        "rev": generate("rev", ReverseDomain(kind="reverse", n_items=300), seed=0),
        "tiny": generate("tiny", AdditionDomain(kind="addition", digits=1, n_items=20), seed=0),
    }


def mixture(**kw: Any) -> MixtureConfig:
    return MixtureConfig(**{"total": 200, **kw})


def test_temperature() -> None:
    assert tempered_proportions({"a": 0.8, "b": 0.2}, 1.0) == pytest.approx({"a": 0.8, "b": 0.2})
    # T=2: sqrt weights -> 0.894 : 0.447 -> 2/3 : 1/3 (flatter); zero weights are dropped.
    assert tempered_proportions({"a": 0.8, "b": 0.2, "c": 0.0}, 2.0) == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert tempered_proportions({"a": 0.8, "b": 0.2}, 0.5) == pytest.approx({"a": 16 / 17, "b": 1 / 17})


def test_largest_remainder_is_exact() -> None:
    proportions = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    assert allocate(100, proportions) == {"a": 34, "b": 33, "c": 33}
    for total in (1, 7, 99, 1001):
        counts = allocate(total, {"a": 0.55, "b": 0.3, "c": 0.15})
        assert sum(counts.values()) == total
        assert all(abs(counts[d] - total * p) < 1 for d, p in {"a": 0.55, "b": 0.3, "c": 0.15}.items())


def test_proportions_match_weights(train) -> None:
    weights = {"add": 0.5, "sub": 0.3, "rev": 0.2}
    m = build_mixture("sft", mixture(weights=weights, format="prompt_completion"), train)
    counts = Counter(row["domain"] for row in m.rows)
    assert len(m.rows) == 200 and counts == {"add": 100, "sub": 60, "rev": 40}
    assert m.manifest["effective_proportions"] == {"add": 0.5, "rev": 0.2, "sub": 0.3}
    # Train items only, no repeats when there are enough.
    train_ids = {r["id"] for items in train.values() for r in items}
    assert set(m.manifest["ids"]) <= train_ids and len(set(m.manifest["ids"])) == 200
    assert m.manifest["ids"] == [row["id"] for row in m.rows]
    assert m.manifest["with_replacement"] == {}


def test_deterministic_and_seeded(train) -> None:
    config = mixture(weights={"add": 1.0, "rev": 1.0})
    assert build_mixture("pretrain", config, train).rows == build_mixture("pretrain", config, train).rows
    assert (
        build_mixture("pretrain", mixture(weights={"add": 1.0, "rev": 1.0}, seed=1), train).rows
        != build_mixture("pretrain", config, train).rows
    )


def test_replacement_only_when_short_and_recorded(train) -> None:
    m = build_mixture("sft", mixture(weights={"tiny": 0.5, "add": 0.5}, format="prompt_completion"), train)
    counts = Counter(r["id"] for r in m.records if r["domain"] == "tiny")
    assert sum(counts.values()) == 100 and len(counts) == 20  # every tiny item used, then repeats
    assert m.manifest["with_replacement"] == {"tiny": 80}
    assert len({r["id"] for r in m.records if r["domain"] == "add"}) == 100


def test_replay_share(train) -> None:
    mixtures = {
        "pretrain": mixture(weights={"add": 0.5, "rev": 0.5}),
        "cpt": mixture(weights={"sub": 1.0}, total=400, replay={"from_stage": "pretrain", "fraction": 0.25}),
    }
    built = {}
    for stage in stage_order(mixtures):
        built[stage] = build_mixture(stage, mixtures[stage], train, built)
    cpt = built["cpt"]
    assert len(cpt.rows) == 400 and cpt.manifest["replay"]["items"] == 100
    counts = Counter(row["domain"] for row in cpt.rows)
    assert counts["sub"] == 300 and counts["add"] + counts["rev"] == 100
    pretrain_ids = {r["id"] for r in built["pretrain"].records}
    replayed = [r for r in cpt.records if r["domain"] != "sub"]
    assert all(r["id"] in pretrain_ids for r in replayed)
    assert cpt.manifest["replay"]["counts"] == {"add": counts["add"], "rev": counts["rev"]}


def test_stage_order_and_cycles() -> None:
    mixtures = {
        "cpt": mixture(weights={"a": 1.0}, replay={"from_stage": "sft", "fraction": 0.2}),
        "sft": mixture(weights={"a": 1.0}, replay={"from_stage": "pretrain", "fraction": 0.2}),
        "pretrain": mixture(weights={"a": 1.0}),
        "grpo": mixture(weights={"a": 1.0}),
    }
    assert stage_order(mixtures) == ["pretrain", "sft", "cpt", "grpo"]
    mixtures["pretrain"] = mixture(weights={"a": 1.0}, replay={"from_stage": "cpt", "fraction": 0.2})
    with pytest.raises(DataError, match="cycle"):
        stage_order(mixtures)


@pytest.mark.parametrize("fmt", [f for f in FORMAT_COLUMNS if f != "conversational"])  # tests/test_formats.py
def test_formats(train, fmt: str) -> None:
    m = build_mixture("dpo", mixture(weights={"add": 1.0, "rev": 1.0}, format=fmt, total=100), train)
    assert all(tuple(row) == FORMAT_COLUMNS[fmt] for row in m.rows)
    by_id = {r["id"]: r for items in train.values() for r in items}
    for row in m.rows:
        record = by_id[row["id"]]
        if fmt == "text":
            assert row["text"] == record["prompt"] + record["answer"]
        if fmt == "prompt_completion":
            assert (row["prompt"], row["completion"]) == (record["prompt"], record["answer"])
        if fmt == "preference":
            assert row["chosen"] == row["answer"] == record["answer"] and row["rejected"] != row["chosen"]
            assert not VERIFIERS[row["verifier"]](row["rejected"], row["answer"])
        if fmt == "prompt_answer":
            assert (row["prompt"], row["answer"], row["verifier"]) == (record["prompt"], record["answer"], "exact")


def test_text_only_domain_cannot_feed_a_prompt_format() -> None:
    docs = {"docs": [make_record("docs", text=f"document {i}") for i in range(10)]}
    assert len(build_mixture("cpt", mixture(weights={"docs": 1.0}, total=5), docs).rows) == 5
    with pytest.raises(
        DataError, match=r"mixtures.sft: format 'prompt_completion' needs items with prompt and answer.*\['docs'\]"
    ):
        build_mixture("sft", mixture(weights={"docs": 1.0}, total=5, format="prompt_completion"), docs)


# --------------------------------------------------------------------------- the stages, in-process


def test_prepare_then_mix_write_the_contract(tmp_path: Path, tiny_params: dict[str, Any]) -> None:
    from stages import mix, prepare

    params, layout = parse_params(tiny_params), Layout(tmp_path)
    prepare.run(params, layout)
    manifest = io.read_json(layout.prepared / "manifest.json")
    assert set(manifest["domains"]) == {"add", "rev", "sub", "add3"} and manifest["decontamination"]["passed"]
    for domain, entry in manifest["domains"].items():
        for split in ("train", "val", "test"):
            path = layout.prepared_split(domain, split)
            rows = io.read_parquet(path)
            assert len(rows) == entry["counts"][split] and io.sha256_file(path) == entry["content_hashes"][split]
            assert all(list(r) == list(RECORD_COLUMNS) for r in rows)
    assert json.loads(layout.metrics("prepare").read_text())["items"] == 1200

    mix.run(params, layout)
    for stage, config in params.mixtures.items():
        folder = layout.mixture(stage)
        m = io.read_json(folder / "manifest.json")
        rows = io.read_parquet(folder / "train.parquet")
        assert m["content_hash"] == io.sha256_file(folder / "train.parquet")
        assert [r["id"] for r in rows] == m["ids"] and len(rows) == config.total
        assert list(rows[0]) == list(FORMAT_COLUMNS[config.format])
    assert json.loads(layout.metrics("mix").read_text())["stages"]["cpt"]["replay"] == 50
    # Nothing but the outputs: no temporary folders left behind.
    assert sorted(p.name for p in (tmp_path / "artifacts" / "data").iterdir()) == ["mixtures", "prepared"]


def test_failed_prepare_keeps_the_old_output(tmp_path: Path, tiny_params: dict[str, Any]) -> None:
    from stages import prepare

    layout = Layout(tmp_path)
    prepare.run(parse_params(tiny_params), layout)
    before = (layout.prepared / "manifest.json").read_bytes()
    # A file domain that repeats a test item in training: decontamination fails the stage.
    victim = io.read_parquet(layout.prepared_split("add", "test"))[0]
    (tmp_path / "leak.jsonl").write_text(
        json.dumps({"prompt": victim["prompt"], "answer": victim["answer"] + "0"}) + "\n"
    )
    tiny_params["data"]["domains"]["leak"] = {"kind": "file", "path": "leak.jsonl"}
    leak = make_record("leak", prompt=victim["prompt"], answer=victim["answer"] + "0", verifier="exact")
    assert split_of(leak["id"], "split-v1", 0.05, 0.10) == "train"  # so the leak is in training data
    with pytest.raises(DataError) as info:
        prepare.run(parse_params(tiny_params), layout)
    assert f"add/test id {victim['id']}" in str(info.value) and f"same as leak train id {leak['id']}" in str(info.value)
    assert (layout.prepared / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "artifacts" / "data").iterdir()) == ["prepared"]


def test_mix_refuses_tampered_prepared_data(tmp_path: Path, tiny_params: dict[str, Any]) -> None:
    from stages import mix, prepare

    params, layout = parse_params(tiny_params), Layout(tmp_path)
    with pytest.raises(DataError, match="run the prepare stage first"):
        mix.run(params, layout)
    prepare.run(params, layout)
    path = layout.prepared_split("add", "train")
    io.write_parquet(io.read_parquet(path)[1:], path, ["id", "domain", "prompt", "answer", "text", "verifier"])
    with pytest.raises(DataError, match=r"add/train.parquet: content hash .* differs from prepare's manifest"):
        mix.run(params, layout)


def test_group_joins_items_into_long_rows(train) -> None:
    """`group: 3`: total rows of 3 items each; the prompt formats put the earlier items, solved, before the last."""
    text = build_mixture("cpt", mixture(weights={"add": 1.0}, total=10, group=3), train)
    assert len(text.rows) == 10 and len(text.records) == 30 and text.manifest["group"] == 3
    first = text.records[:3]
    assert text.rows[0]["text"] == "\n".join(r["text"] for r in first)
    assert text.rows[0]["id"] == f"{first[0]['id']}+2"
    answers = build_mixture("grpo", mixture(weights={"add": 1.0}, total=4, format="prompt_answer", group=3), train)
    a, b, c = answers.records[:3]
    assert answers.rows[0]["prompt"] == f"{a['prompt']}{a['answer']}\n{b['prompt']}{b['answer']}\n{c['prompt']}"
    assert (answers.rows[0]["answer"], answers.rows[0]["verifier"]) == (c["answer"], c["verifier"])
    prefs = build_mixture("dpo", mixture(weights={"add": 1.0}, total=4, format="preference", group=2), train)
    assert prefs.rows[0]["chosen"] == prefs.records[1]["answer"] != prefs.rows[0]["rejected"]
    # One item per row (the default) leaves rows and manifest as they always were.
    single = build_mixture("cpt", mixture(weights={"add": 1.0}, total=10), train)
    assert "group" not in single.manifest and [r["text"] for r in single.rows] == [r["text"] for r in single.records]


def test_group_of_chat_items_is_one_multi_turn_conversation() -> None:
    from posttrain.data.formats import decode_messages

    chat = {"add": generate("add", AdditionDomain(kind="addition", digits=2, n_items=50, chat=True), seed=0)}
    sft = build_mixture("sft", mixture(weights={"add": 1.0}, total=5, format="conversational", group=4), chat)
    turns = decode_messages(sft.rows[0]["messages"])
    assert [t["role"] for t in turns] == ["user", "assistant"] * 4
    assert turns[-1]["content"] == sft.records[3]["answer"]
    grpo = build_mixture("grpo", mixture(weights={"add": 1.0}, total=5, format="prompt_answer", group=3), chat)
    prompt = decode_messages(grpo.rows[0]["prompt"])
    assert [t["role"] for t in prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert grpo.rows[0]["answer"] == grpo.records[2]["answer"]


def test_group_with_online_mixing_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="online mixing re-draws single items per domain, expected group: 1"):
        MixtureConfig(weights={"add": 1.0}, group=2, adaptive={})


def test_text_mixture_models_a_conversation_through_the_chat_template(tmp_path) -> None:
    """CPT replaying general chat sees it as the chat model does: the template's rendering, not `user: ...`."""
    from helpers.tiny import bos_tokenizer

    from posttrain import io
    from posttrain.config import TrainStageConfig
    from posttrain.data.domains import chat_record as chat_form
    from posttrain.data.domains import make_record
    from posttrain.layout import Layout
    from posttrain.training.inputs import chat_texts, load_text_mixture

    plain = make_record("lore", text="Velka lives in Brinnos.")
    chat = chat_form(make_record("chat", prompt="12+3=", answer="15", verifier="exact"))
    mixture = build_mixture("cpt", MixtureConfig(weights={"lore": 1.0, "chat": 1.0}, total=2, format="text"),
                            {"lore": [plain], "chat": [chat]})  # fmt: skip
    layout = Layout(tmp_path)
    io.write_parquet(mixture.rows, layout.mixture("cpt") / "train.parquet", mixture.columns)
    tokenizer = bos_tokenizer()
    texts = load_text_mixture(layout, "cpt", tokenizer, TrainStageConfig(max_length=64))["text"]
    conversation = [{"role": "user", "content": "12+3="}, {"role": "assistant", "content": "15"}]
    assert sorted(texts) == sorted([plain["text"], chat_texts(tokenizer, [conversation], "t")[0]])
    assert any(t.startswith("<|im_start|>user\n12+3=") for t in texts)  # BOS-free: the tokenizer adds it
