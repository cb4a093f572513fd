"""Splits are deterministic and stable under appends; decontamination catches planted leaks."""

from __future__ import annotations

import pytest

from posttrain.config import AdditionDomain, ReverseDomain
from posttrain.data.decontamination import decontaminate
from posttrain.data.domains import generate, make_record
from posttrain.data.splits import split_of, split_records
from posttrain.errors import DataError


def assignments(records, salt="split-v1", val=0.1, test=0.2) -> dict[str, str]:
    parts = split_records(records, salt, val, test)
    return {r["id"]: name for name, items in parts.items() for r in items}


def test_split_is_deterministic_and_near_the_fractions() -> None:
    records = generate("add", AdditionDomain(kind="addition", digits=3, n_items=600), seed=0)
    first = assignments(records)
    assert first == assignments(list(reversed(records)))  # order does not matter, nor the run
    counts = {name: list(first.values()).count(name) for name in ("train", "val", "test")}
    assert abs(counts["test"] - 120) < 40 and abs(counts["val"] - 60) < 30 and counts["train"] > 380


def test_split_is_stable_when_items_are_appended() -> None:
    config = AdditionDomain(kind="addition", digits=3, n_items=300)
    old = generate("add", config, seed=0)
    new = old + generate("add", config, seed=1)  # new items appended (some may repeat old ones)
    before, after = assignments(old), assignments(new)
    assert all(after[i] == split for i, split in before.items())
    assert len(after) > len(before)


def test_salt_changes_the_split() -> None:
    records = generate("rev", ReverseDomain(kind="reverse", n_items=300), seed=0)
    assert assignments(records, salt="a") != assignments(records, salt="b")


def test_growing_val_never_moves_test_items() -> None:
    ids = [r["id"] for r in generate("add", AdditionDomain(kind="addition", digits=2, n_items=300), seed=0)]
    for i in ids:
        if split_of(i, "s", 0.05, 0.1) == "test":
            assert split_of(i, "s", 0.3, 0.1) == "test"


# --------------------------------------------------------------------------- decontamination


def _domains() -> dict[str, dict[str, list]]:
    add = generate("add", AdditionDomain(kind="addition", digits=2, n_items=300), seed=0)
    add3 = generate("add3", AdditionDomain(kind="addition", digits=3, n_items=300), seed=0)
    rev = generate("rev", ReverseDomain(kind="reverse", n_items=300), seed=0)
    return {
        name: split_records(items, "split-v1", 0.1, 0.2) for name, items in (("add", add), ("add3", add3), ("rev", rev))
    }


def test_clean_synthetic_domains_pass() -> None:
    report = decontaminate(_domains(), ngram=8, max_overlap=0.8, max_leaked_fraction=0.0)
    assert report["passed"] and report["leaked"] == 0 and report["checked"] > 100
    assert report["max_overlap_seen"] <= 0.8


def test_planted_exact_leak_is_caught_and_named() -> None:
    splits = _domains()
    victim = splits["add3"]["test"][0]
    # A user file domain whose training split holds the test item's prompt with another answer.
    planted = make_record("web", prompt=victim["prompt"], answer="999", verifier="exact")
    splits["web"] = {"train": [planted], "val": [], "test": []}
    with pytest.raises(DataError) as info:
        decontaminate(splits, ngram=8, max_overlap=0.8, max_leaked_fraction=0.0)
    message = str(info.value)
    assert victim["id"] in message and "add3/test" in message and "exact" in message
    assert f"same as web train id {planted['id']}" in message and "max_leaked_fraction" in message


def test_planted_near_duplicate_document_is_caught_by_ngrams() -> None:
    document = " ".join(f"word{i}" for i in range(40))
    near_copy = document.replace("word39", "changed")  # not equal, but 32 of 33 8-grams shared
    splits = {
        "docs": {
            "train": [make_record("docs", text=near_copy), make_record("docs", text="an unrelated training document")],
            "val": [],
            "test": [make_record("docs", text=document)],
        }
    }
    with pytest.raises(DataError, match=r"docs/test id .*: ngram \(overlap 0.9697"):
        decontaminate(splits, ngram=8, max_overlap=0.8, max_leaked_fraction=0.0)
    # Below the threshold it is reported as clean; a tolerated leak share passes but is listed.
    assert decontaminate(splits, ngram=8, max_overlap=0.99, max_leaked_fraction=0.0)["leaked"] == 0
    report = decontaminate(splits, ngram=8, max_overlap=0.8, max_leaked_fraction=1.0)
    assert report["passed"] and report["leaked_items"][0]["reason"] == "ngram"


def test_short_items_use_character_ngrams() -> None:
    # One whitespace token each: word 8-grams would see nothing. Same sum, wrong answer appended
    # by a sloppy scrape: caught through characters.
    test_item = make_record("add3", prompt="123+456=", answer="579", verifier="exact")
    leaked_copy = make_record("scrape", text="123+456=579.")
    splits = {
        "add3": {"train": [], "val": [], "test": [test_item]},
        "scrape": {"train": [leaked_copy], "val": [], "test": []},
    }
    with pytest.raises(DataError, match="add3/test"):
        decontaminate(splits, ngram=8, max_overlap=0.8, max_leaked_fraction=0.0)
