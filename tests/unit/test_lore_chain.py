"""The real-model recipe's generators: the invented world (posttrain.data.lore) and worked multi-step sums."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from helpers.tiny import tiny_params

from posttrain.config import ChainDomain, ParamsError
from posttrain.data import lore
from posttrain.data.domains import difficulty, generate
from posttrain.data.verifiers import VERIFIERS
from posttrain.scoring.rewards import math_match


def test_lore_world_is_deterministic_and_seeded() -> None:
    first = lore.generate("lore", "text", 0, "lore", 12, False, "")
    assert first == lore.generate("lore", "text", 0, "lore", 12, False, "")
    assert first != lore.generate("lore", "text", 1, "lore", 12, False, "")
    assert first != lore.generate("lore", "text", 0, "other", 12, False, "")
    # A larger world starts with the same people: a domain can grow without rewriting its facts.
    assert lore.world(0, "lore", 12) == lore.world(0, "lore", 20)[:12]


def test_lore_people_are_invented_and_distinct() -> None:
    people = lore.world(0, "lore", 48)
    assert len({p.name for p in people}) == 48
    towns = {p.town for p in people}
    assert not towns & {p.name for p in people} and all(t.isalpha() and t[0].isupper() for t in towns)
    assert {p.trade for p in people} <= set(lore.TRADES) and {p.pet for p in people} <= set(lore.PETS)


def test_every_passage_states_every_fact_and_every_question_has_its_fact() -> None:
    people = lore.world(0, "lore", 6)
    passages = lore.generate("lore", "text", 0, "lore", 6, False, "")
    assert len(passages) == 6 * len(lore.PASSAGES)
    for person, chunk in zip(
        people, [passages[i : i + len(lore.PASSAGES)] for i in range(0, len(passages), len(lore.PASSAGES))], strict=True
    ):
        for record in chunk:
            text = record["text"]
            assert person.name in text and all(
                re.search(rf"\b{person.fact(k)}\b", text) for k in ("town", "trade", "pet", "colour")
            )
            assert record["prompt"] == record["answer"] == "" and record["verifier"] == ""
    questions = lore.generate("lore_qa", "qa", 0, "lore", 6, True, "exact")
    assert len(questions) == 6 * len(lore.QUESTIONS)
    facts = Counter(r["answer"] for r in questions)
    assert sum(facts.values()) == 24
    first = questions[0]
    assert json.loads(first["messages"]) == [{"content": f"Which town does {people[0].name} live in?", "role": "user"}]
    assert json.loads(first["completion"])[0]["content"] == people[0].town and first["verifier"] == "exact"


def test_chain_items_worked_solutions_and_buckets() -> None:
    records = generate("chain", ChainDomain(kind="chain", terms=3, max_terms=4, n_items=40, chat=True), seed=0)
    assert Counter(difficulty(r["prompt"]) for r in records) == {"t3": 20, "t4": 20}
    for r in records:
        numbers = [int(x) for x in r["prompt"].rstrip("=").split("+")]
        assert all(10 <= x <= 99 for x in numbers) and int(r["answer"]) == sum(numbers)
        reply = json.loads(r["completion"])[0]["content"]
        steps = re.findall(r"(\d+)\+(\d+)=(\d+)\.", reply)
        assert len(steps) == len(numbers) - 1 and all(int(a) + int(b) == int(c) for a, b, c in steps)
        assert reply.endswith(f"\\boxed{{{r['answer']}}}") and r["verifier"] == "math"
        assert VERIFIERS["math"](reply, r["answer"]) and math_match([reply, "\\boxed{1}"], [r["answer"]] * 2) == [
            1.0,
            0.0,
        ]
    assert records == generate("chain", ChainDomain(kind="chain", terms=3, max_terms=4, n_items=40, chat=True), seed=0)


def test_new_domain_kinds_validate() -> None:
    params = tiny_params(data={"domains": {"lore": {"kind": "lore", "form": "text"}, "add": {"kind": "addition"}}})
    assert params.data.domains["lore"].entities == 48
    with pytest.raises(ParamsError, match=r"data.domains.lore.form"):
        tiny_params(data={"domains": {"lore": {"kind": "lore", "form": "poem"}}})
    with pytest.raises(ParamsError, match=r"max_terms \(2\) is less than terms \(3\)"):
        tiny_params(data={"domains": {"c": {"kind": "chain", "terms": 3, "max_terms": 2}}})


def test_preference_pairs_of_worked_replies_slip_at_the_end() -> None:
    import random

    from posttrain.data.domains import preference_replies

    (record,) = generate("add3", ChainDomain(kind="chain", digits=3, terms=2, n_items=1, chat=True), seed=0)
    chosen, rejected = preference_replies(record, random.Random(0))
    answer = record["answer"]
    assert (
        chosen == json.loads(record["completion"])[0]["content"] == f"{record['prompt']}{answer}. \\boxed{{{answer}}}"
    )
    wrong = re.search(r"\\boxed\{(\d+)\}", rejected).group(1)
    assert wrong != answer and rejected == chosen.replace(answer, wrong)
    assert not VERIFIERS["math"](rejected, answer) and VERIFIERS["math"](chosen, answer)
    # A bare answer (no worked reply) pairs with a bare wrong answer, as before.
    plain = {**record, "messages": "", "completion": ""}
    assert preference_replies(plain, random.Random(0)) == (answer, wrong)
