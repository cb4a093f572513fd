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
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from posttrain.config import DPOStageConfig
from posttrain.data.domains import wrong_answer
from posttrain.data.verifiers import VERIFIERS
from posttrain.errors import DataError
from posttrain.models.encoding import encode
from posttrain.scoring.generation import answer_budget, generate
from posttrain.training.data import check_lengths

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
    section: DPOStageConfig, model: Any, tokenizer: Any, rows: list[dict[str, str]], seed: int
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The DPO stage's training pairs as `section.pairs` says, and metrics on how they were made.

    `offline`: the mixture's rows as they are; `on_policy`: `build_on_policy_pairs` from the model's samples.
    """
    pair_counts: dict[str, Any] = {"on_policy": 0, "offline": len(rows)}
    sampling_seconds = 0.0
    if section.pairs == "on_policy":
        started = time.perf_counter()
        rows, counts = build_on_policy_pairs(
            model,
            tokenizer,
            rows,
            samples=section.on_policy_samples,
            max_new_tokens=answer_budget(tokenizer, [r["answer"] for r in rows]),
            seed=seed,
        )
        sampling_seconds = time.perf_counter() - started
        pair_counts = counts.as_dict()
        log.info("dpo: %s (sampling took %.1f s)", pair_counts, sampling_seconds)
    return rows, {"pairs": section.pairs, "pair_counts": pair_counts, "sampling_seconds": round(sampling_seconds, 2)}


def pair_dataset(rows: Sequence[dict[str, str]], tokenizer: Any, section: DPOStageConfig, where: str) -> Any:
    """The DPO training set (`prompt`, `chosen`, `rejected`) after checking both sides' lengths."""
    import datasets  # lazy: heavy, and the stage modules import this one at start-up

    texts = [r["prompt"] + r[side] for side in ("chosen", "rejected") for r in rows]
    check_lengths(texts, [r["id"] for r in rows] * 2, tokenizer, section.max_length, section.on_too_long, where)
    return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])


def offline_pairs(records: Sequence[dict[str, str]], seed: int) -> list[dict[str, str]]:
    """Offline pairs for held-out records: a user's own pair where the record has one, else chosen =
    answer and rejected = the data layer's wrong answer."""
    rng = random.Random(seed)
    return [
        {
            **{c: r[c] for c in ("id", "domain", "prompt", "answer", "verifier")},
            "chosen": r["chosen"] if r.get("chosen") else r["answer"],
            "rejected": r["rejected"] if r.get("chosen") else wrong_answer(r, rng),
        }
        for r in records
    ]


def completion_logps(
    model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 64
) -> list[float]:
    """Sum of log p(completion + EOS | prompt) per pair, tokenized the way TRL's DPOTrainer does.

    DPOTrainer appends the EOS token to the completion text, tokenizes with the tokenizer's special
    tokens (the BOS once on the pipeline's BOS-free strings, `encode`) and takes the completion to
    start where the tokenized prompt and prompt+completion diverge; doing the same here makes these
    numbers the policy side of TRL's implicit reward.
    """
    # lazy: torch takes seconds to import; only model code paths need it
    import torch

    eos = tokenizer.eos_token
    sequences: list[tuple[list[int], int]] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids, full_ids = encode(tokenizer, [prompt, prompt + completion + eos])
        start = 0
        while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
            start += 1
        sequences.append((full_ids, start))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for begin in range(0, len(sequences), batch_size):
                chunk = sequences[begin : begin + batch_size]
                width = max(len(ids) for ids, _ in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                scored = torch.zeros((len(chunk), width), dtype=torch.bool)
                for row, (ids, start) in enumerate(chunk):  # right padding: positions as in training
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    mask[row, : len(ids)] = 1
                    scored[row, max(start, 1) : len(ids)] = True
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
                logps = torch.log_softmax(logits[:, :-1], dim=-1)
                token_logps = logps.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
                out.extend((token_logps * scored[:, 1:].to(device)).sum(dim=1).tolist())
    finally:
        model.train(was_training)
    return out


def preference_margins(model: Any, tokenizer: Any, pairs: Sequence[dict[str, str]]) -> list[float]:
    """log p(chosen) - log p(rejected) under `model`, per pair (positive: the model prefers chosen)."""
    prompts = [p["prompt"] for p in pairs]
    chosen = completion_logps(model, tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected = completion_logps(model, tokenizer, prompts, [p["rejected"] for p in pairs])
    return [c - r for c, r in zip(chosen, rejected, strict=True)]
