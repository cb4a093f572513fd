"""Synthetic verifiable domains, the record schema, and wrong answers for offline DPO.

The verifiers (`exact`, `numeric`) live in posttrain.data.verifiers.

Every generator draws `n_items` distinct items from an enumerable item space: an item is an index
into that space, so uniqueness is exact (no retry loops that may never end) and the result depends
only on (seed, domain name, knobs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import string
import sys
from typing import TYPE_CHECKING

from posttrain.data.formats import CONVERSATION_COLUMNS, chat_fields, render_plain

if TYPE_CHECKING:  # annotations only: config's domain classes
    from posttrain.config import AdditionDomain, ChainDomain, ReverseDomain, SubtractionDomain

    SyntheticDomain = AdditionDomain | SubtractionDomain | ReverseDomain | ChainDomain

log = logging.getLogger("posttrain.data")

RECORD_COLUMNS = ("id", "domain", "prompt", "answer", "text", "verifier", *CONVERSATION_COLUMNS)
Record = dict[str, str]

# --------------------------------------------------------------------------- records


def record_id(domain: str, prompt: str, answer: str, text: str, **conversation: str) -> str:
    """sha256 of the item's content, first 16 hex chars (JSON-encoded so field borders are unambiguous).

    Conversation fields (canonical JSON strings) join the hashed content only when set, so items
    without them keep the ids, and so the splits, they had before those fields existed.
    """
    extra = [conversation.get(name, "") for name in CONVERSATION_COLUMNS]
    fields = [domain, prompt, answer, text] + (extra if any(extra) else [])
    content = json.dumps(fields, ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def make_record(
    domain: str,
    *,
    prompt: str = "",
    answer: str = "",
    text: str | None = None,
    verifier: str = "",
    messages: str = "",
    completion: str = "",
    chosen: str = "",
    rejected: str = "",
) -> Record:
    """A record in the schema of docs/design.md. Verifiable items get text = prompt + answer.

    `messages`, `completion`, `chosen`, `rejected` follow posttrain.data.formats (canonical JSON
    for conversational items, plain strings for standard prompt-completion and preference items).
    """
    if text is None:
        text = prompt + answer
    conversation = {"messages": messages, "completion": completion, "chosen": chosen, "rejected": rejected}
    return {
        "id": record_id(domain, prompt, answer, text, **conversation),
        "domain": domain,
        "prompt": prompt,
        "answer": answer,
        "text": text,
        "verifier": verifier,
        **conversation,
    }


def chat_record(record: Record, reply: str | None = None) -> Record:
    """The conversational rendering of a prompt/answer record (the `chat: true` option of a domain): the
    assistant turn is `reply` (a worked solution ending in the answer) or else the answer itself."""
    fields = chat_fields(record["prompt"], reply or record["answer"])
    text = render_plain([*json.loads(fields["messages"]), *json.loads(fields["completion"])])
    return make_record(
        record["domain"],
        prompt=record["prompt"],
        answer=record["answer"],
        text=text,
        verifier=record["verifier"],
        **fields,
    )


def is_verifiable(record: Record) -> bool:
    """A prompt (plain, or conversational prompt turns) with a gold answer."""
    return bool(record["prompt"] or record.get("messages")) and bool(record["answer"])


# --------------------------------------------------------------------------- generators


def _operand_range(digits: int) -> tuple[int, int]:
    """Operands with exactly `digits` digits (no leading zero); 1 digit includes 0."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


class Generator:
    """An enumerable item space: `size()` items, `item(i)` -> (prompt, answer)."""

    kind = ""
    default_verifier = "exact"

    def size(self) -> int:
        raise NotImplementedError

    def strata(self) -> list[int]:
        """Sizes of consecutive index ranges that get equal shares of the items (default: one)."""
        return [self.size()]

    def item(self, index: int) -> tuple[str, str]:
        raise NotImplementedError

    def worked(self, index: int) -> str | None:
        """A worked solution of item `index` that ends in its answer (the chat reply SFT learns); None: the
        answer alone is the reply."""
        return None


class AdditionGenerator(Generator):
    kind = "addition"

    def __init__(self, digits: int) -> None:
        self.lo, self.hi = _operand_range(digits)
        self.m = self.hi - self.lo + 1

    def size(self) -> int:
        return self.m * self.m

    def item(self, index: int) -> tuple[str, str]:
        a, b = self.lo + index // self.m, self.lo + index % self.m
        return f"{a}+{b}=", str(a + b)


class SubtractionGenerator(Generator):
    """a - b with a >= b (non-negative results), both with `digits` digits."""

    kind = "subtraction"

    def __init__(self, digits: int) -> None:
        self.lo, self.hi = _operand_range(digits)
        self.m = self.hi - self.lo + 1

    def size(self) -> int:
        return self.m * (self.m + 1) // 2

    def item(self, index: int) -> tuple[str, str]:
        # Triangular indexing: pairs (i, j) with j <= i are numbered row by row.
        i = (math.isqrt(8 * index + 1) - 1) // 2
        j = index - i * (i + 1) // 2
        a, b = self.lo + i, self.lo + j
        return f"{a}-{b}=", str(a - b)


class ReverseGenerator(Generator):
    """Reverse a lowercase word of min_length..max_length letters."""

    kind = "reverse"

    def __init__(self, min_length: int, max_length: int) -> None:
        self.lengths = list(range(min_length, max_length + 1))

    def size(self) -> int:
        return sum(26**n for n in self.lengths)

    def strata(self) -> list[int]:
        # One stratum per length: uniform over all words would make nearly every word max_length
        # letters long (26^6 of the 26^3..26^6 words), defeating the min_length knob.
        return [26**n for n in self.lengths]

    def item(self, index: int) -> tuple[str, str]:
        for n in self.lengths:
            if index < 26**n:
                letters = []
                for _ in range(n):
                    index, r = divmod(index, 26)
                    letters.append(string.ascii_lowercase[r])
                word = "".join(letters)
                return f"rev:{word}=", word[::-1]
            index -= 26**n
        raise IndexError("index beyond the item space")


class ChainGenerator(Generator):
    """Multi-step addition: `terms` operands of `digits` digits, e.g. `23+45+17=` -> `85`.

    The worked solution adds left to right, one sum per step, and boxes the answer for math-verify:
    `23+45=68. 68+17=85. \\boxed{85}`.
    """

    kind = "chain"
    default_verifier = "math"

    def __init__(self, digits: int, terms: int) -> None:
        self.lo, self.hi = _operand_range(digits)
        self.m = self.hi - self.lo + 1
        self.terms = terms

    def size(self) -> int:
        return self.m**self.terms

    def operands(self, index: int) -> list[int]:
        out = []
        for _ in range(self.terms):
            index, r = divmod(index, self.m)
            out.append(self.lo + r)
        return out

    def item(self, index: int) -> tuple[str, str]:
        numbers = self.operands(index)
        return "+".join(map(str, numbers)) + "=", str(sum(numbers))

    def worked(self, index: int) -> str:
        numbers = self.operands(index)
        steps, total = [], numbers[0]
        for number in numbers[1:]:
            steps.append(f"{total}+{number}={total + number}.")
            total += number
        return " ".join(steps) + f" \\boxed{{{total}}}"


class BucketedGenerator(Generator):
    """Consecutive item spaces (one per difficulty bucket), each stratum getting an equal share."""

    def __init__(self, parts: list[Generator]) -> None:
        self.parts = parts
        self.kind = parts[0].kind
        self.default_verifier = parts[0].default_verifier

    def size(self) -> int:
        return sum(part.size() for part in self.parts)

    def strata(self) -> list[int]:
        return [part.size() for part in self.parts]

    def _locate(self, index: int) -> tuple[Generator, int]:
        for part in self.parts:
            if index < part.size():
                return part, index
            index -= part.size()
        raise IndexError("index beyond the item space")

    def item(self, index: int) -> tuple[str, str]:
        part, local = self._locate(index)
        return part.item(local)

    def worked(self, index: int) -> str | None:
        part, local = self._locate(index)
        return part.worked(local)


def make_generator(config: SyntheticDomain) -> Generator:
    """The generator for a synthetic domain config (AdditionDomain, SubtractionDomain, ReverseDomain, ChainDomain)."""
    if config.kind == "chain":
        if config.max_terms is None or config.max_terms == config.terms:
            return ChainGenerator(config.digits, config.terms)
        return BucketedGenerator([ChainGenerator(config.digits, t) for t in range(config.terms, config.max_terms + 1)])
    if config.kind in ("addition", "subtraction"):
        cls = AdditionGenerator if config.kind == "addition" else SubtractionGenerator
        if config.max_digits is None or config.max_digits == config.digits:
            return cls(config.digits)  # one bucket: the item space (and so the items) of a plain domain
        return BucketedGenerator([cls(d) for d in range(config.digits, config.max_digits + 1)])
    if config.kind == "reverse":
        return ReverseGenerator(config.min_length, config.max_length)
    raise ValueError(f"domain kind {config.kind!r} is not a synthetic generator")


GENERATOR_KINDS = ("addition", "subtraction", "reverse", "chain")

_ARITHMETIC = re.compile(r"(\d+)([+-])(\d+)=")
_CHAIN = re.compile(r"\d+(\+\d+){2,}=")
_REVERSE = re.compile(r"rev:([a-z]+)=")


def difficulty(prompt: str) -> str:
    """The difficulty bucket of an item, read from its prompt: `d<digits>` of the longer operand for
    two-operand arithmetic, `t<terms>` for a chain of three or more, `len<letters>` for reverse, `all`
    for anything else (one bucket)."""
    if m := _ARITHMETIC.fullmatch(prompt):
        return f"d{max(len(m.group(1)), len(m.group(3)))}"
    if _CHAIN.fullmatch(prompt):
        return f"t{prompt.count('+') + 1}"
    if m := _REVERSE.fullmatch(prompt):
        return f"len{len(m.group(1))}"
    return "all"


def _shares(sizes: list[int], n: int) -> list[int]:
    """Split n as evenly as possible over strata, none above its size (water-filling)."""
    shares = [0] * len(sizes)
    open_ = [i for i, size in enumerate(sizes) if size > 0]
    left = n
    while left > 0 and open_:
        each, extra = divmod(left, len(open_))
        for rank, i in enumerate(list(open_)):
            give = min(each + (1 if rank < extra else 0), sizes[i] - shares[i])
            shares[i] += give
            left -= give
        open_ = [i for i in open_ if shares[i] < sizes[i]]
    return shares


def _distinct_indices(rng: random.Random, space: int, n: int) -> list[int]:
    if space <= n:
        return list(range(space))
    if space < sys.maxsize:
        return rng.sample(range(space), n)
    # Spaces past sys.maxsize (e.g. 12-digit operands) do not fit range(); collisions are then
    # vanishingly rare, so rejection sampling ends almost at once.
    seen: set[int] = set()
    out: list[int] = []
    while len(out) < n:
        index = rng.randrange(space)
        if index not in seen:
            seen.add(index)
            out.append(index)
    return out


def generate(name: str, config: SyntheticDomain, seed: int, verifier: str | None = None) -> list[Record]:
    """`config.n_items` distinct records of a synthetic domain, deterministic in (seed, name, knobs).

    If the item space is smaller than n_items every item is produced once, and that is logged.
    """
    generator = make_generator(config)
    space = generator.size()
    # Seeding with the domain name too keeps two domains with equal knobs from being identical.
    rng = random.Random(f"{seed}:{name}:{generator.kind}")
    indices: list[int] = []
    offset = 0
    strata = generator.strata()
    for size, share in zip(strata, _shares(strata, config.n_items), strict=True):
        indices.extend(offset + i for i in _distinct_indices(rng, size, share))
        offset += size
    if space < config.n_items:
        log.warning(
            "domain %s: asked for %d items but the %s space holds only %d distinct items; using all of them",
            name,
            config.n_items,
            generator.kind,
            space,
        )
    verifier = verifier or generator.default_verifier
    records = []
    for index in indices:
        prompt, answer = generator.item(index)
        record = make_record(name, prompt=prompt, answer=answer, verifier=verifier)
        records.append(chat_record(record, generator.worked(index)) if config.chat else record)
    return records


# --------------------------------------------------------------------------- wrong answers


def _digit_slips(answer: str) -> set[str]:
    """Change one digit by +-1 (no new leading zero)."""
    out = set()
    for pos, ch in enumerate(answer):
        for delta in (-1, 1):
            digit = (int(ch) + delta) % 10
            if pos == 0 and digit == 0 and len(answer) > 1:
                continue
            out.add(answer[:pos] + str(digit) + answer[pos + 1 :])
    return out


def _carry_errors(a: int, op: str, b: int) -> set[str]:
    """The classic slips: a dropped carry (addition) or a forgotten borrow (subtraction)."""
    out = set()
    correct = a + b if op == "+" else a - b
    carry, pos = 0, 0
    x, y = a, b
    while x or y:
        da, db = x % 10, y % 10
        if op == "+":
            carry = 1 if da + db + carry >= 10 else 0
            if carry:
                out.add(str(correct - 10 ** (pos + 1)))
        else:
            borrow = 1 if da - db - carry < 0 else 0
            carry = borrow
            if borrow:
                out.add(str(correct + 10 ** (pos + 1)))
        x, y, pos = x // 10, y // 10, pos + 1
    return {v for v in out if not v.startswith("-")}


def _letter_swaps(answer: str) -> set[str]:
    return {
        answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
        for i in range(len(answer) - 1)
        if answer[i] != answer[i + 1]
    }


def _letter_change(answer: str, rng: random.Random) -> str:
    pos = rng.randrange(len(answer))
    pool = string.ascii_lowercase if answer[pos].isalpha() or not answer[pos].isdigit() else string.digits
    choices = [c for c in pool if c != answer[pos]]
    return answer[:pos] + rng.choice(choices) + answer[pos + 1 :]


def reply_of(record: Record) -> str:
    """The reply a record demonstrates: its assistant turn's content for a conversational prompt-completion
    record (a worked solution ends in the answer), else its answer."""
    if record.get("messages") and record.get("completion"):
        turns = json.loads(record["completion"])
        if turns and turns[-1]["role"] == "assistant":
            return turns[-1]["content"]
    return record.get("answer") or ""


def preference_replies(record: Record, rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected) replies for offline DPO: the demonstrated reply (`reply_of`) and the same reply with
    its answer replaced, wherever it stands alone, by a plausible wrong answer (`wrong_answer`): a worked
    solution that slips at the end, in the format the model was taught. A bare answer gives the wrong one."""
    reply, answer, wrong = reply_of(record), record["answer"], wrong_answer(record, rng)
    if reply == answer:
        return reply, wrong
    alone = re.compile(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])")
    rejected = alone.sub(lambda _: wrong, reply)
    return reply, rejected if rejected != reply else wrong


def wrong_answer(record: Record, rng: random.Random) -> str:
    """A plausible wrong answer for `record` (offline DPO's `rejected`); never equal to the answer.

    Arithmetic: a dropped carry / forgotten borrow, a digit slip or an off-by-one. Reverse: two
    swapped letters or the word left unreversed. Anything else: a digit slip for integer answers,
    swapped or changed characters otherwise.
    """
    answer = record["answer"]
    if not answer:
        raise ValueError(f"record {record['id']} of domain {record['domain']!r} has no answer to get wrong")
    candidates: set[str] = set()
    if m := _ARITHMETIC.fullmatch(record["prompt"]):
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        candidates |= _carry_errors(a, op, b) | _digit_slips(answer)
        candidates |= {str(int(answer) + d) for d in (-1, 1) if int(answer) + d >= 0}
    elif m := _REVERSE.fullmatch(record["prompt"]):
        candidates |= _letter_swaps(answer) | {m.group(1)}
    elif re.fullmatch(r"\d+", answer.strip()):
        candidates |= _digit_slips(answer.strip())
    else:
        candidates |= _letter_swaps(answer)
    candidates.discard(answer)
    if candidates:
        return rng.choice(sorted(candidates))  # sorted: the choice depends only on rng, not set order
    # All letters equal ("aaa") or a one-character answer: change one character.
    return _letter_change(answer, rng)
