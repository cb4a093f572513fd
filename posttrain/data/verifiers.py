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


def verify_math(completion: str, answer: str) -> bool:
    """math-verify's judgement: the completion's answer (LaTeX, `\\boxed{}`, or a plain expression)
    is mathematically equal to the gold answer, so `0.5`, `1/2` and `\\frac{2}{4}` all match `1/2`.

    The whole completion is parsed, unlike `exact`/`numeric`: free-form answers carry prose around
    the value. math-verify's timeouts use SIGALRM, which exists only in the main thread; elsewhere
    (e.g. a reward function called from a worker thread) they are off.
    """
    import threading  # lazy: stdlib, only the math verifier needs it

    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(answer, parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math verifier: gold answer {answer!r} is not a parsable math expression")
    return bool(verify(gold, parse(completion, parsing_timeout=timeout), timeout_seconds=timeout))


VERIFIERS: dict[str, Callable[[str, str], bool]] = {
    "exact": exact_match,
    "numeric": verify_numeric,
    "math": verify_math,
}
