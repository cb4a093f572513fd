"""Verifiers: does a completion give the item's answer? Picked per item by its `verifier` column.

Stdlib only: `posttrain.config` imports VERIFIERS to validate `verifier:` names, and that import must
stay cheap.
"""

from __future__ import annotations

from collections.abc import Callable


def _cut(completion: str, answer: str) -> str:
    # Generation may run on past the answer (no EOS learned yet): keep the first line, and of it as
    # many whitespace tokens as the gold answer has (one for every synthetic domain).
    first_line = completion.strip().split("\n", 1)[0]
    n_tokens = max(1, len(answer.split()))
    return " ".join(first_line.split()[:n_tokens])


def exact_match(completion: str, answer: str) -> bool:
    """Completion (stripped, cut at the first newline / after the answer's token count) equals the answer.

    The project's one exact match: the evaluate stage (verifier `exact`), continual evaluation during
    training and the GRPO `exact_match` reward all call it, so they cannot disagree about one model.
    """
    return _cut(completion, answer) == " ".join(answer.split())


def verify_numeric(completion: str, answer: str) -> bool:
    """Like `exact`, but compares integers, so `046` matches `46`."""
    got = _cut(completion, answer)
    try:
        return int(got) == int(answer.strip())
    except ValueError:
        return False


VERIFIERS: dict[str, Callable[[str, str], bool]] = {
    "exact": exact_match,
    "numeric": verify_numeric,
}
