"""Synthetic generators, verifiers and wrong answers."""

from __future__ import annotations

import logging
import random
import re
from collections import Counter

import pytest

from posttrain.config import AdditionDomain, ReverseDomain, SubtractionDomain
from posttrain.data.domains import difficulty, generate, make_record, record_id, wrong_answer
from posttrain.data.formats import CONVERSATION_COLUMNS
from posttrain.data.verifiers import VERIFIERS


def _check_schema(records: list[dict[str, str]], domain: str) -> None:
    for r in records:
        assert list(r) == ["id", "domain", "prompt", "answer", "text", "verifier", *CONVERSATION_COLUMNS]
        assert all(r[c] == "" for c in CONVERSATION_COLUMNS)  # plain items: conversation fields empty
        assert r["domain"] == domain and r["text"] == r["prompt"] + r["answer"] and r["verifier"] == "exact"
        assert r["id"] == record_id(domain, r["prompt"], r["answer"], r["text"]) and len(r["id"]) == 16


@pytest.mark.parametrize("digits", [1, 2, 3, 5])
def test_addition_answers_are_right(digits: int) -> None:
    records = generate("add", AdditionDomain(kind="addition", digits=digits, n_items=300), seed=0)
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    _check_schema(records, "add")
    for r in records:
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", r["prompt"]).groups())
        assert lo <= a < 10**digits and lo <= b < 10**digits
        assert int(r["answer"]) == a + b
        assert VERIFIERS["exact"](r["answer"], r["answer"])


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_subtraction_answers_are_right_and_non_negative(digits: int) -> None:
    records = generate("sub", SubtractionDomain(kind="subtraction", digits=digits, n_items=300), seed=0)
    _check_schema(records, "sub")
    for r in records:
        a, b = map(int, re.fullmatch(r"(\d+)-(\d+)=", r["prompt"]).groups())
        assert a >= b and int(r["answer"]) == a - b and len(str(a)) == len(str(b)) == digits


def test_reverse_answers_are_right() -> None:
    records = generate("rev", ReverseDomain(kind="reverse", min_length=2, max_length=5, n_items=300), seed=0)
    _check_schema(records, "rev")
    lengths: dict[int, int] = {}
    for r in records:
        word = re.fullmatch(r"rev:([a-z]+)=", r["prompt"]).group(1)
        assert r["answer"] == word[::-1]
        lengths[len(word)] = lengths.get(len(word), 0) + 1
    assert sorted(lengths.values()) == [75, 75, 75, 75]  # each length gets an equal share


def test_generation_is_deterministic_unique_and_seeded() -> None:
    config = AdditionDomain(kind="addition", digits=3, n_items=300)
    first, again = generate("add3", config, seed=7), generate("add3", config, seed=7)
    assert first == again
    assert len({r["id"] for r in first}) == 300
    assert [r["id"] for r in generate("add3", config, seed=8)] != [r["id"] for r in first]
    # Same knobs under another name: not the same items.
    assert {r["prompt"] for r in generate("other", config, seed=7)} != {r["prompt"] for r in first}


def test_small_space_gives_every_item_once_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="posttrain.data"):
        records = generate("sub1", SubtractionDomain(kind="subtraction", digits=1, n_items=1000), seed=0)
    assert len(records) == 55 == len({r["prompt"] for r in records})  # pairs 0 <= b <= a <= 9
    assert "only 55 distinct items" in caplog.text


def test_huge_space_past_sys_maxsize() -> None:
    records = generate("big", AdditionDomain(kind="addition", digits=12, n_items=50), seed=0)
    assert len({r["id"] for r in records}) == 50
    assert all(int(r["answer"]) == sum(map(int, r["prompt"][:-1].split("+"))) for r in records)


def test_exact_verifier() -> None:
    exact = VERIFIERS["exact"]
    assert exact("46", "46") and exact(" 46 ", "46") and exact("46\n12+3=", "46") and exact("46 and more", "46")
    assert not exact("47", "46") and not exact("", "46") and not exact("4 6", "46") and not exact("460", "46")
    assert exact("New York\nfoo", "New York") and not exact("New Yorker", "New York")
    assert VERIFIERS["numeric"]("046", "46") and not VERIFIERS["numeric"]("abc", "46")


def test_math_verifier_judges_equal_values() -> None:
    math = VERIFIERS["math"]
    assert math("The answer is 46.", "46") and math("046", "46") and math("$\\boxed{46}$", "46")
    assert math("0.5", "1/2") and math("$\\frac{2}{4}$", "\\frac{1}{2}") and math("\\boxed{0.5}", "\\frac{1}{2}")
    assert not math("45", "46") and not math("", "46") and not math("45 46 47", "46") and not math("0.49", "1/2")
    with pytest.raises(ValueError, match=r"gold answer 'banana' is not a parsable math expression"):
        math("46", "banana")


def test_math_verifier_works_off_the_main_thread() -> None:
    # SIGALRM timeouts exist only in the main thread; reward functions may run elsewhere.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(VERIFIERS["math"], "x = 1/2", "0.5").result()
        assert not pool.submit(VERIFIERS["math"], "x = 1/3", "0.5").result()


def test_math_is_a_known_verifier_name() -> None:
    assert AdditionDomain(kind="addition", verifier="math").verifier == "math"


@pytest.mark.parametrize(
    "config",
    [
        AdditionDomain(kind="addition", digits=1, n_items=100),
        AdditionDomain(kind="addition", digits=2, n_items=300),
        AdditionDomain(kind="addition", digits=3, n_items=300),
        SubtractionDomain(kind="subtraction", digits=2, n_items=300),
        ReverseDomain(kind="reverse", min_length=1, max_length=4, n_items=300),
    ],
    ids=lambda c: c.kind,
)
def test_wrong_answers_are_never_right(config) -> None:
    rng = random.Random(0)
    records = generate("d", config, seed=1)
    for r in records:
        for _ in range(3):
            wrong = wrong_answer(r, rng)
            assert wrong and wrong != r["answer"] and not VERIFIERS["exact"](wrong, r["answer"])
            if config.kind != "reverse":
                assert wrong.isdigit() and (wrong == "0" or not wrong.startswith("0"))
            else:
                assert len(wrong) == len(r["answer"])


def test_wrong_answers_are_plausible_slips() -> None:
    # 57+68=125: the two dropped carries give 115 and 25; digit slips and off-by-one stay close.
    record = make_record("add", prompt="57+68=", answer="125", verifier="exact")
    seen = {wrong_answer(record, random.Random(i)) for i in range(200)}
    assert {"115", "25", "124", "126", "135"} <= seen
    assert all(abs(int(w) - 125) <= 100 for w in seen)
    # 52-17=35: forgetting the borrow gives 45.
    assert "45" in {
        wrong_answer(make_record("sub", prompt="52-17=", answer="35"), random.Random(i)) for i in range(200)
    }


def test_wrong_answer_edge_cases() -> None:
    rng = random.Random(0)
    for prompt, answer in [("rev:aaa=", "aaa"), ("rev:a=", "a"), ("rev:aba=", "aba")]:
        assert wrong_answer(make_record("rev", prompt=prompt, answer=answer), rng) != answer
    # File domains: generic fallback.
    for answer in ("Paris", "x", "42", "0"):
        wrong = wrong_answer(make_record("qa", prompt="Q: ?", answer=answer), rng)
        assert wrong != answer and wrong
    with pytest.raises(ValueError, match="no answer"):
        wrong_answer(make_record("doc", text="just text"), rng)


@pytest.mark.parametrize("kind", ["addition", "subtraction"])
def test_max_digits_gives_equal_difficulty_buckets(kind: str) -> None:
    config = (AdditionDomain if kind == "addition" else SubtractionDomain)(
        kind=kind, digits=2, max_digits=4, n_items=300
    )
    buckets = Counter(difficulty(r["prompt"]) for r in generate("x", config, seed=0))
    assert buckets == {"d2": 100, "d3": 100, "d4": 100}
    # Without max_digits (or equal to digits) the items are those of the plain domain.
    plain = AdditionDomain(kind="addition", digits=2, n_items=50)
    same = AdditionDomain(kind="addition", digits=2, max_digits=2, n_items=50)
    assert generate("x", plain, seed=0) == generate("x", same, seed=0)


def test_difficulty_buckets_of_prompts() -> None:
    assert difficulty("7+123=") == "d3" and difficulty("45-12=") == "d2"
    assert difficulty("rev:abcde=") == "len5" and difficulty("hello") == "all"


def test_max_digits_below_digits_is_refused() -> None:
    with pytest.raises(ValueError, match="max_digits"):
        AdditionDomain(kind="addition", digits=3, max_digits=2)
