"""Check that no val/test item leaked into any domain's training split.

Two checks, both against the training splits of every domain (a file domain may repeat a
synthetic item under another name):

1. Exact: an evaluation item's prompt, or its text, equals a training item's prompt or text
   (after collapsing whitespace).
2. N-gram overlap: the share of an evaluation item's n-grams that occur anywhere in training data.
   Tokens are words when the item has at least `ngram` words (prose: the usual word n-gram check),
   and characters otherwise. Synthetic items are one "word" (`123+456=579`), so word n-grams
   would find nothing at all; character n-grams of length 8 still see a near copy such as the
   same sum with a different answer, while two distinct sums share few of them (every gram that
   holds both operands and the `+` is unique to the item, so distinct 3-digit sums stay below
   0.8). Items shorter than n characters are one gram: the whole string.

An item is leaked when it matches exactly or its overlap exceeds `max_overlap`. The stage fails
(DataError naming the leaked items) when the leaked share of evaluation items exceeds
`max_leaked_fraction`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from posttrain.data.domains import Record
from posttrain.errors import DataError

_LISTED = 20  # leaked items listed in the report and the error message


def _norm(text: str) -> str:
    return " ".join(text.split())


def _ngrams(text: str, n: int) -> tuple[str, list[tuple[str, ...] | str]]:
    """('word'|'char:<k>', grams) for one item."""
    words = text.split()
    if len(words) >= n:
        return "word", [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    k = min(n, len(text))
    return f"char:{k}", [text[i : i + k] for i in range(len(text) - k + 1)]


class _TrainingGrams:
    """N-gram sets of all training texts, built lazily per token kind (word, char:<k>)."""

    def __init__(self, texts: list[str], n: int) -> None:
        self.texts, self.n = texts, n
        self.sets: dict[str, set[Any]] = {}

    def get(self, kind: str) -> set[Any]:
        if kind not in self.sets:
            grams: set[Any] = set()
            if kind == "word":
                for text in self.texts:
                    words = text.split()
                    grams.update(tuple(words[i : i + self.n]) for i in range(len(words) - self.n + 1))
            else:
                k = int(kind.split(":")[1])
                for text in self.texts:
                    grams.update(text[i : i + k] for i in range(len(text) - k + 1))
            self.sets[kind] = grams
        return self.sets[kind]


def decontaminate(
    splits: dict[str, dict[str, list[Record]]], ngram: int, max_overlap: float, max_leaked_fraction: float
) -> dict[str, Any]:
    """Check every val/test item of `splits` ({domain: {split: records}}) against all training data.

    Returns the report (for the prepare manifest); raises DataError naming the leaked items when
    the leaked share of evaluation items is above `max_leaked_fraction`.
    """
    train_keys: dict[str, tuple[str, str]] = {}  # normalised prompt or text -> (domain, id)
    train_texts: list[str] = []
    for domain, parts in splits.items():
        for record in parts["train"]:
            for key in (record["prompt"], record["text"]):
                if key:
                    train_keys.setdefault(_norm(key), (domain, record["id"]))
            train_texts.append(_norm(record["text"]))
    grams = _TrainingGrams(train_texts, ngram)

    leaked: list[dict[str, Any]] = []
    checked = 0
    per_domain: dict[str, dict[str, int]] = defaultdict(lambda: {"checked": 0, "exact": 0, "ngram": 0})
    max_seen = 0.0
    for domain, parts in splits.items():
        for split in ("val", "test"):
            for record in parts[split]:
                checked += 1
                per_domain[domain]["checked"] += 1
                text = _norm(record["text"])
                match = next(
                    (train_keys[_norm(k)] for k in (record["prompt"], record["text"]) if k and _norm(k) in train_keys),
                    None,
                )
                kind, item_grams = _ngrams(text, ngram)
                overlap = 0.0
                if item_grams:
                    training = grams.get(kind)
                    overlap = sum(g in training for g in item_grams) / len(item_grams)
                max_seen = max(max_seen, overlap)
                if match is None and overlap <= max_overlap:
                    continue
                reason = "exact" if match is not None else "ngram"
                per_domain[domain][reason] += 1
                leaked.append(
                    {
                        "id": record["id"],
                        "domain": domain,
                        "split": split,
                        "reason": reason,
                        "overlap": round(overlap, 4),
                        "text": record["text"][:80],
                        "matches": {"domain": match[0], "id": match[1]} if match else None,
                    }
                )
    fraction = len(leaked) / checked if checked else 0.0
    report = {
        "method": f"exact prompt/text match + {ngram}-gram overlap (words for items of >= {ngram} words, else characters)",
        "ngram": ngram,
        "max_overlap": max_overlap,
        "max_leaked_fraction": max_leaked_fraction,
        "checked": checked,
        "leaked": len(leaked),
        "leaked_fraction": round(fraction, 6),
        "max_overlap_seen": round(max_seen, 4),
        "per_domain": dict(per_domain),
        "leaked_items": leaked[:_LISTED],
        "passed": fraction <= max_leaked_fraction,
    }
    if not report["passed"]:
        listed = "\n".join(
            f"  {item['domain']}/{item['split']} id {item['id']} {item['text']!r}: {item['reason']} "
            f"(overlap {item['overlap']}"
            + (f", same as {item['matches']['domain']} train id {item['matches']['id']})" if item["matches"] else ")")
            for item in leaked[:_LISTED]
        )
        more = f"\n  ... and {len(leaked) - _LISTED} more" if len(leaked) > _LISTED else ""
        raise DataError(
            f"decontamination: {len(leaked)} of {checked} val/test item(s) leaked into training data "
            f"({fraction:.4f} > data.decontamination.max_leaked_fraction = {max_leaked_fraction}):\n{listed}{more}"
        )
    return report
