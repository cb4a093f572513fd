"""On-policy preference pairs for DPO.

For each prompt of the `dpo` mixture the input model is sampled `on_policy_samples` times; each
sample is checked with the item's verifier (posttrain.data.verifiers.VERIFIERS). A prompt with at
least one correct and one incorrect sample gives an on-policy pair (chosen = a correct sample,
rejected = the model's most frequent mistake). Where every sample agrees (all right: nothing to
push down; all wrong: nothing of the model's own to push up) the row keeps its offline pair from
the mixture (chosen = answer, rejected = the data layer's `wrong_answer`). Both kinds are counted.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from posttrain.config import DPOStageConfig, EngineConfig
from posttrain.data.verifiers import VERIFIERS
from posttrain.errors import DataError
from posttrain.scoring.engines import GenerationStats
from posttrain.scoring.generation import answer_budget, generate
from posttrain.training.inputs import check_lengths

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("id", "domain", "prompt", "chosen", "rejected", "answer", "verifier")


@dataclass
class PairCounts:
    """How the pairs were made: on-policy, or the offline fallback and why."""

    on_policy: int = 0
    offline_all_correct: int = 0
    offline_all_wrong: int = 0
    samples: int = 0
    correct_samples: int = 0

    @property
    def offline(self) -> int:
        return self.offline_all_correct + self.offline_all_wrong

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["offline"] = self.offline
        out["on_policy_fraction"] = self.on_policy / max(1, self.on_policy + self.offline)
        out["sample_accuracy"] = self.correct_samples / max(1, self.samples)
        return out


def verifier_for(name: str) -> Callable[[str, str], bool]:
    """The data layer's checker called `name` (`verify(completion, answer) -> bool`)."""
    try:
        return VERIFIERS[name]
    except KeyError:
        raise DataError(f"verifier {name!r} is not registered; expected one of {sorted(VERIFIERS)}") from None


def pair_from_samples(
    samples: Sequence[str], answer: str, verify: Callable[[str, str], bool]
) -> tuple[str, str] | None:
    """(chosen, rejected) from one prompt's samples, or None when they all agree.

    Chosen is the shortest correct sample: verifiers accept trailing text after the answer, and
    preferring it would teach the model to ramble. Rejected is the most frequent wrong sample, the
    mistake the model makes most (ties broken by first appearance, so the result is deterministic).
    """
    cleaned = [s.strip() for s in samples]
    correct = [s for s in cleaned if verify(s, answer)]
    wrong = [s for s in cleaned if not verify(s, answer)]
    if not correct or not wrong:
        return None
    chosen = min(correct, key=len)
    rejected = Counter(wrong).most_common(1)[0][0]
    return chosen, rejected


def build_on_policy_pairs(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, str]],
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 128,
    engine: str = "hf",
    options: EngineConfig | None = None,
    stats: GenerationStats | None = None,
) -> tuple[list[dict[str, str]], PairCounts]:
    """Pairs for every row of a `preference` mixture, in row order, and how they were made.

    `rows` need the preference columns (PAIR_COLUMNS); their `chosen`/`rejected` are the offline
    fallback. Sampling is seeded, so the same model and seed give the same pairs.
    """
    if samples < 2:
        raise ValueError(f"on-policy pairs need at least 2 samples per prompt, got {samples}")
    missing = [c for c in PAIR_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise DataError(f"preference rows lack column(s) {missing}; expected columns {list(PAIR_COLUMNS)}")
    completions = generate(
        model,
        tokenizer,
        [row["prompt"] for row in rows],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        do_sample=True,
        temperature=temperature,
        num_return_sequences=samples,
        seed=seed,
        engine=engine,
        options=options,
        stats=stats,
    )
    counts = PairCounts()
    pairs: list[dict[str, str]] = []
    for row, drawn in zip(rows, completions, strict=True):
        verify = verifier_for(row["verifier"])
        n_correct = sum(verify(s, row["answer"]) for s in drawn)
        counts.samples += len(drawn)
        counts.correct_samples += n_correct
        pair = pair_from_samples(drawn, row["answer"], verify)
        out = {c: row[c] for c in PAIR_COLUMNS}
        if pair is None:
            if n_correct:
                counts.offline_all_correct += 1
            else:
                counts.offline_all_wrong += 1
        else:
            out["chosen"], out["rejected"] = pair
            counts.on_policy += 1
        pairs.append(out)
    return pairs, counts


def training_pairs(
    section: DPOStageConfig,
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, str]],
    seed: int,
    engine: str = "hf",
    options: EngineConfig | None = None,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The DPO stage's training pairs as `section.pairs` says, and metrics on how they were made.

    `offline`: the mixture's rows as they are; `on_policy`: `build_on_policy_pairs` from the model's
    samples through `engine`, whose generated tokens and tokens/s go into `sampling_generation`.
    """
    pair_counts: dict[str, Any] = {"on_policy": 0, "offline": len(rows)}
    sampling_seconds = 0.0
    stats = GenerationStats()
    if section.pairs == "on_policy":
        started = time.perf_counter()
        rows, counts = build_on_policy_pairs(
            model,
            tokenizer,
            rows,
            samples=section.on_policy_samples,
            max_new_tokens=answer_budget(tokenizer, [r["answer"] for r in rows]),
            seed=seed,
            engine=engine,
            options=options,
            stats=stats,
        )
        sampling_seconds = time.perf_counter() - started
        pair_counts = counts.as_dict()
        log.info("dpo: %s (sampling took %.1f s; %s)", pair_counts, sampling_seconds, stats.as_dict())
    return rows, {
        "pairs": section.pairs,
        "pair_counts": pair_counts,
        "sampling_seconds": round(sampling_seconds, 2),
        "sampling_generation": {"engine": engine, **stats.as_dict()} if section.pairs == "on_policy" else None,
    }


def pair_dataset(rows: Sequence[dict[str, str]], tokenizer: Any, section: DPOStageConfig, where: str) -> Any:
    """The DPO training set (`prompt`, `chosen`, `rejected`) after checking both sides' lengths."""
    import datasets

    texts = [r["prompt"] + r[side] for side in ("chosen", "rejected") for r in rows]
    check_lengths(texts, [r["id"] for r in rows] * 2, tokenizer, section.max_length, section.on_too_long, where)
    return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
