"""Reward functions for GRPO, picked by name from params.yaml (`grpo.rewards: [{name, weight}]`).

Each reward is a plain TRL-style callable `f(completions, answer, **columns) -> list[float]`: TRL
passes every dataset column except `prompt`/`completion` as a keyword list, so the gold column is
`answer` (see docs/design.md). Pure Python, no torch: importing this module is cheap, which lets
`posttrain.config` check reward names at validation time.

Completions are plain decoded strings (no chat template; generation stops on EOS).
"""

from __future__ import annotations

import functools
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.data import verifiers
from posttrain.errors import ParamsError, StageError

RewardFunction = Callable[..., list[float]]

_NUMBER = re.compile(r"-?\d+")
_WORD = re.compile(r"[A-Za-z]+")


def normalise(text: str) -> str:
    """The answer a completion gives: leading/trailing space stripped, cut at the first whitespace."""
    parts = text.strip().split(maxsplit=1)
    return parts[0] if parts else ""


def exact_match(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion gives the answer (posttrain.data.verifiers.exact_match, the project's one exact match)."""
    return [float(verifiers.exact_match(c, a)) for c, a in zip(completions, answer, strict=True)]


def math_match(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 when math-verify finds the completion's answer (a `\\boxed{}` value, or its last expression)
    mathematically equal to the gold answer: the reward for worked solutions (posttrain.data.verifiers.verify_math)."""
    return [float(verifiers.verify_math(c, a)) for c, a in zip(completions, answer, strict=True)]


def _digit_score(predicted: str, gold: str) -> float:
    if not gold:
        return float(not predicted)
    right = sum(p == g for p, g in zip(predicted, gold, strict=False))
    # Dividing by the longer length penalises a wrong length: "12" and "1234" for gold "123" both
    # lose credit, so the reward cannot be gamed by padding or truncating.
    return right / max(len(predicted), len(gold))


def digit_match(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """Partial credit in [0, 1]: share of answer characters right position by position.

    Unlike exact match, a group of samples that are all wrong (or all nearly right) still has
    reward variance, which is what gives GRPO an advantage signal on items the policy rarely solves.
    """
    return [_digit_score(normalise(c), normalise(a)) for c, a in zip(completions, answer, strict=True)]


def _shape_of(gold: str) -> re.Pattern[str] | None:
    if _NUMBER.fullmatch(gold):
        return _NUMBER
    if _WORD.fullmatch(gold):
        return _WORD
    return None


def format_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 for an answer-shaped completion: non-empty, one token, same character class as the gold
    answer (digits for arithmetic, letters for words), nothing trailing after it; else 0.0."""
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        text = completion.strip()
        shape = _shape_of(gold.strip())
        if not text:
            scores.append(0.0)
        elif shape is None:  # free-form gold: only ask for a single token without trailing junk
            scores.append(float(len(text.split()) == 1))
        else:
            scores.append(float(shape.fullmatch(text) is not None))
    return scores


format_reward.__name__ = "format"  # the registry name, also what TRL logs as rewards/format/mean


def length_penalty(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """0.0 up to the answer's length, then -(extra characters / answer length), floored at -1."""
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        extra = len(completion.strip()) - len(gold.strip())
        scores.append(-min(1.0, extra / max(1, len(gold.strip()))) if extra > 0 else 0.0)
    return scores


# --------------------------------------------------------------------------- code execution

# Limits for running a generated snippet: CPU seconds, address space, bytes written, wall seconds.
CODE_CPU_SECONDS = 2
CODE_MEMORY_BYTES = 256 * 1024 * 1024
CODE_FILE_BYTES = 1024 * 1024
CODE_WALL_SECONDS = 5.0
CODE_OUTPUT_CHARS = 10_000


def _limit_child() -> None:  # pragma: no cover - runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_CPU, (CODE_CPU_SECONDS, CODE_CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (CODE_MEMORY_BYTES, CODE_MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (CODE_FILE_BYTES, CODE_FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_snippet(code: str, timeout: float = CODE_WALL_SECONDS) -> tuple[int | None, str]:
    """Run untrusted `code` with `python -I` in a throwaway folder: (exit status or None on timeout, stdout).

    Generated code is never run in the trainer's process: a child with CPU, memory and file-size
    limits, an empty environment (no tokens or passwords inherited), isolated mode (no user site,
    no PYTHON* variables) and its own session, killed as a group when the wall timeout passes.
    """
    with tempfile.TemporaryDirectory(prefix="posttrain-snippet-") as folder:
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", code],
            cwd=folder,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            errors="replace",
            preexec_fn=_limit_child,
            start_new_session=True,
        )
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the snippet's own children too
            process.communicate()
            return None, ""
    return process.returncode, out[:CODE_OUTPUT_CHARS]


def python_output(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion, run as a Python snippet (sandboxed, see run_snippet), prints `answer`.

    A snippet that fails, times out or hits a resource limit scores 0.0.
    """
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        status, out = run_snippet(completion)
        scores.append(float(status == 0 and out.strip() == gold.strip()))
    return scores


REWARDS: dict[str, RewardFunction] = {
    "exact_match": exact_match,
    "math_match": math_match,
    "digit_match": digit_match,
    "format": format_reward,
    "length_penalty": length_penalty,
    "python_output": python_output,
}


def known_rewards() -> list[str]:
    return sorted(REWARDS)


def get_reward(name: str) -> RewardFunction:
    """The registered reward function called `name`; ParamsError listing the known names otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ParamsError(
            f"grpo.rewards: unknown reward function {name!r}; expected one of {known_rewards()}"
        ) from None


def guarded(name: str, func: RewardFunction) -> RewardFunction:
    """Wrap a reward so that any failure stops the stage with an error naming the function.

    TRL would otherwise surface a bare traceback from deep inside its generation loop, or silently
    turn a wrong-length result into a shape error.
    """

    @functools.wraps(func)
    def call(completions: list[str], **columns: Any) -> list[float]:
        if "answer" not in columns:
            raise StageError(
                f"reward function {name!r}: the dataset has no 'answer' column (got columns {sorted(columns)}); "
                "GRPO needs the prompt_answer mixture format"
            )
        try:
            values = [float(v) for v in func(completions, **columns)]
        except Exception as error:
            raise StageError(f"reward function {name!r} failed: {type(error).__name__}: {error}") from error
        if len(values) != len(completions):
            raise StageError(
                f"reward function {name!r} returned {len(values)} values for {len(completions)} completions"
            )
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise StageError(f"reward function {name!r} returned non-finite values {bad[:3]}")
        return values

    call.__name__ = name  # TRL logs rewards/<__name__>/mean
    return call


def build_rewards(specs: Sequence[Any]) -> tuple[list[RewardFunction], list[float]]:
    """Guarded reward callables and their weights from `grpo.rewards` entries (objects with name, weight)."""
    funcs = [guarded(spec.name, get_reward(spec.name)) for spec in specs]
    return funcs, [float(spec.weight) for spec in specs]


def combined_reward(specs: Sequence[Any], completions: list[str], answer: list[str], **columns: Any) -> list[float]:
    """The weighted sum of the rewards, as TRL combines them (used to score models outside training)."""
    funcs, weights = build_rewards(specs)
    totals = [0.0] * len(completions)
    for func, weight in zip(funcs, weights, strict=True):
        for i, value in enumerate(func(completions, answer=answer, **columns)):
            totals[i] += weight * value
    return totals
