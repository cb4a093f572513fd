"""Evaluation metrics: greedy exact match, pass@k, loss/perplexity, bootstrap CIs, forgetting.

The thing being evaluated is an `Answerer`: greedy completions, sampled completions and per-text
token losses. `ModelAnswerer` (a causal LM + tokenizer) is the default; tests plug in an oracle or
a broken model and go through exactly the same scoring code. The output schema is documented in
docs/eval-schema.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from posttrain.errors import DataError
from posttrain.scoring.engines import GenerationStats
from posttrain.scoring.generation import generate
from posttrain.scoring.intervals import bootstrap_indices, mean_ci, percentile_ci, ratio_ci
from posttrain.scoring.loss import token_losses

if TYPE_CHECKING:
    import pandas as pd

    from posttrain.config import EngineConfig

SCHEMA_VERSION = 1
Verifier = Callable[[str, str], bool]


# --------------------------------------------------------------------------- statistics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as a product (Chen et al. 2021) so large n does not overflow.
    """
    if not 0 <= c <= n or not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 0 < k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# --------------------------------------------------------------------------- answerers


class Answerer(Protocol):
    """What evaluation needs from a model. `token_losses` may return None (no loss available)."""

    def greedy(self, prompts: list[str]) -> list[str]: ...

    def sample(self, prompts: list[str], n: int, *, temperature: float, seed: int) -> list[list[str]]: ...

    def token_losses(self, texts: list[str]) -> tuple[list[float], list[int]] | None: ...


@dataclass
class ModelAnswerer:
    """A causal LM: generation through an engine (posttrain.scoring.generation, .engines) and summed
    token NLL. `stats` accumulates the generation time and tokens of every call (greedy and sampled)."""

    model: Any
    tokenizer: Any
    max_new_tokens: int = 8
    batch_size: int = 128
    engine: str = "hf"
    options: EngineConfig | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    def greedy(self, prompts: list[str]) -> list[str]:
        out = generate(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            engine=self.engine,
            options=self.options,
            stats=self.stats,
        )
        return [c[0] for c in out]

    def sample(self, prompts: list[str], n: int, *, temperature: float, seed: int) -> list[list[str]]:
        # n sequences per prompt: keep the number of rows per forward pass near batch_size.
        return generate(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=max(1, self.batch_size // n),
            do_sample=True,
            temperature=temperature,
            num_return_sequences=n,
            seed=seed,
            engine=self.engine,
            options=self.options,
            stats=self.stats,
        )

    def token_losses(self, texts: list[str]) -> tuple[list[float], list[int]]:
        """Per text: summed next-token NLL over `text` + EOS and the number of predicted tokens."""
        return token_losses(self.model, self.tokenizer, texts, self.batch_size)


# --------------------------------------------------------------------------- one model, one domain


@dataclass(frozen=True)
class EvalSettings:
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    pass_n: int = 8
    pass_k: tuple[int, ...] = (1, 4)
    pass_temperature: float = 0.8
    pass_max_items: int = 100


def evaluate_domain(
    answerer: Answerer,
    items: pd.DataFrame,
    verifiers: dict[str, Verifier],
    settings: EvalSettings,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Score one domain's items. Returns the domain's entry of eval.json and per-item vectors
    (`exact_match`, `pass_at_<k>`) that the paired forgetting bootstrap needs.

    Verifiable items (non-empty prompt, answer and verifier) get exact match and pass@k; every item
    with text gets loss and perplexity.
    """
    s = settings
    frame = items.fillna("")
    verifiable = frame[(frame["prompt"] != "") & (frame["answer"] != "") & (frame["verifier"] != "")]
    unknown = sorted(set(verifiable["verifier"]) - set(verifiers))
    if unknown:
        raise DataError(f"verifier(s) {unknown} in the test split are not in VERIFIERS ({sorted(verifiers)})")
    prompts, answers = verifiable["prompt"].tolist(), verifiable["answer"].tolist()
    checks = [verifiers[v] for v in verifiable["verifier"]]
    per_item: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    exact = None
    if prompts:
        completions = answerer.greedy(prompts)
        hits = np.array([float(check(c, a)) for check, c, a in zip(checks, completions, answers, strict=True)])
        per_item["exact_match"] = hits
        exact = mean_ci(hits, samples=s.bootstrap_samples, confidence=s.confidence, seed=s.seed)
    seconds["greedy"] = time.perf_counter() - started

    started = time.perf_counter()
    pass_k: dict[str, Any] | None = None
    if prompts and s.pass_k:
        m = min(len(prompts), s.pass_max_items)
        samples = answerer.sample(prompts[:m], s.pass_n, temperature=s.pass_temperature, seed=s.seed)
        correct = [
            sum(check(c, a) for c in outs)
            for check, outs, a in zip(checks[: len(samples)], samples, answers[: len(samples)], strict=True)
        ]
        pass_k = {"n_samples": s.pass_n, "temperature": s.pass_temperature}
        for k in s.pass_k:
            scores = np.array([pass_at_k(s.pass_n, c, k) for c in correct])
            per_item[f"pass_at_{k}"] = scores
            pass_k[str(k)] = mean_ci(scores, samples=s.bootstrap_samples, confidence=s.confidence, seed=s.seed)
    seconds["pass_at_k"] = time.perf_counter() - started

    started = time.perf_counter()
    texts = [t for t in frame["text"].tolist() if t]
    loss = perplexity = None
    losses = answerer.token_losses(texts) if texts else None
    if losses is not None:
        loss = ratio_ci(*losses, samples=s.bootstrap_samples, confidence=s.confidence, seed=s.seed)
        if loss["mean"] is not None:
            # exp is monotone: the loss interval maps onto the perplexity interval.
            perplexity = {k: _safe_exp(loss[k]) for k in ("mean", "ci_low", "ci_high")}
    seconds["loss"] = time.perf_counter() - started
    seconds["total"] = sum(seconds.values())

    entry = {
        "n_items": int(len(frame)),
        "n_verifiable": len(prompts),
        "exact_match": exact,
        # Per verifiable item, '1' where the greedy answer was accepted: two models scored on the same items
        # are compared paired (posttrain.tracking.rules).
        "correct": "".join("1" if hit else "0" for hit in per_item["exact_match"]) if prompts else None,
        "pass_at_k": pass_k,
        "loss": loss,
        "perplexity": perplexity,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    }
    return entry, per_item


def preference_entry(margins: Sequence[float], settings: EvalSettings) -> dict[str, Any]:
    """A domain's preference scores from its test pairs' margins (posttrain.scoring.preference): accuracy
    (chosen strictly more likely than rejected) and the mean log-probability margin, each with a bootstrap CI."""
    s = settings
    wins = [1.0 if m > 0 else 0.0 for m in margins]
    return {
        "accuracy": mean_ci(wins, samples=s.bootstrap_samples, confidence=s.confidence, seed=s.seed),
        "logp_margin": mean_ci(margins, samples=s.bootstrap_samples, confidence=s.confidence, seed=s.seed),
    }


def _safe_exp(x: float | None) -> float | None:
    if x is None:
        return None
    return math.exp(x) if x < 700 else float("inf")


# --------------------------------------------------------------------------- forgetting


def forgetting(
    per_item: dict[str, dict[str, np.ndarray]],
    stages: Sequence[str],
    *,
    samples: int,
    confidence: float,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Forgetting of one domain along the pipeline: per stage, best earlier score minus its score.

    `per_item[stage]` is the per-item score vector of each stage on the SAME items. The CI resamples
    items once and applies the same resample to every stage (paired bootstrap), so item difficulty
    cancels out. The first stage has no earlier stage: None. Positive values = forgotten.
    """
    present = [st for st in stages if st in per_item]
    if not present:
        return {}
    n = len(per_item[present[0]])
    if any(len(per_item[st]) != n for st in present):
        raise ValueError("forgetting needs every stage scored on the same items")
    scores = np.stack([per_item[st] for st in present])  # (stages, items)
    idx = bootstrap_indices(n, samples, seed)
    boot = scores[:, idx].mean(axis=2)  # (stages, samples)
    means = scores.mean(axis=1)
    out: dict[str, dict[str, Any] | None] = {present[0]: None}
    for j in range(1, len(present)):
        best = int(np.argmax(means[:j]))
        value = float(means[:j].max() - means[j])
        low, high = percentile_ci(boot[:j].max(axis=0) - boot[j], confidence)
        out[present[j]] = {"value": value, "ci_low": low, "ci_high": high, "best_earlier_stage": present[best]}
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- whole report


def build_report(
    results: dict[str, dict[str, dict[str, Any]]],
    per_item: dict[str, dict[str, dict[str, np.ndarray]]],
    stages: Sequence[str],
    domains: Sequence[str],
    settings: EvalSettings,
    *,
    models_info: dict[str, dict[str, Any]] | None = None,
    config: dict[str, Any] | None = None,
    prepared_manifest_hash: str | None = None,
    engine: str | None = None,
) -> dict[str, Any]:
    """Assemble eval.json from per-model per-domain entries (see docs/eval-schema.md).

    `engine`: the generation engine every model was scored with (`generation.engine`); a model's own
    `models_info[stage]["generation"]` (engine, generated tokens, seconds, tokens/s) is kept as given.
    """
    s = settings
    stages = [st for st in stages if st in results]
    models: dict[str, Any] = {}
    for st in stages:
        info = dict((models_info or {}).get(st, {}))
        info["domains"] = results[st]
        info["seconds"] = round(sum(d["seconds"]["total"] for d in results[st].values()), 4)
        models[st] = info

    matrix: dict[str, dict[str, float | None]] = {
        st: {d: (results[st].get(d, {}).get("exact_match") or {}).get("mean") for d in domains} for st in stages
    }
    forgetting_by_stage: dict[str, dict[str, Any]] = {st: {} for st in stages}
    for d in domains:
        vectors = {
            st: per_item[st][d]["exact_match"] for st in stages if "exact_match" in per_item.get(st, {}).get(d, {})
        }
        if len(vectors) < 1:
            continue
        f = forgetting(vectors, stages, samples=s.bootstrap_samples, confidence=s.confidence, seed=s.seed)
        for st, value in f.items():
            forgetting_by_stage[st][d] = value
    worst: dict[str, Any] = {}
    for d in domains:
        candidates = [(st, forgetting_by_stage[st].get(d)) for st in stages if forgetting_by_stage[st].get(d)]
        if candidates:
            st, v = max(candidates, key=lambda item: item[1]["value"])
            worst[d] = {"stage": st, **v}

    # Also per model, so a reader of one model's entry (e.g. the promotion rules) finds its forgetting.
    for st in stages:
        models[st]["forgetting"] = {d: v for d, v in forgetting_by_stage[st].items() if v is not None}

    summary: dict[str, float] = {}
    for st in stages:
        for d, entry in results[st].items():
            prefix = f"{st}.{d}"
            if entry["exact_match"]:
                summary[f"{prefix}.exact_match"] = _round(entry["exact_match"]["mean"])
            for k in s.pass_k:
                if entry["pass_at_k"] and str(k) in entry["pass_at_k"]:
                    summary[f"{prefix}.pass_at_{k}"] = _round(entry["pass_at_k"][str(k)]["mean"])
            if entry["loss"] and entry["loss"]["mean"] is not None:
                summary[f"{prefix}.loss"] = _round(entry["loss"]["mean"])
                summary[f"{prefix}.perplexity"] = _round(entry["perplexity"]["mean"])
            if entry.get("preference"):
                summary[f"{prefix}.preference_accuracy"] = _round(entry["preference"]["accuracy"]["mean"])
            f = forgetting_by_stage[st].get(d)
            if f:
                summary[f"{prefix}.forgetting"] = _round(f["value"])
        rate = (models[st].get("generation") or {}).get("tokens_per_second")
        if rate is not None:
            summary[f"{st}.generated_tokens_per_second"] = _round(rate, 2)

    return {
        "schema_version": SCHEMA_VERSION,
        "config": config or {},
        "prepared_manifest_hash": prepared_manifest_hash,
        "generation": {"engine": engine},
        "stages": list(stages),
        "domains": list(domains),
        "models": models,
        "forgetting": {
            "metric": "exact_match",
            "scores": matrix,
            "forgetting": forgetting_by_stage,
            "worst": worst,
        },
        "summary": summary,
    }


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)
