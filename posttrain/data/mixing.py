"""Training mixtures: domain weights -> exact counts -> sampled items -> rows in a stage's format.

- Temperature: weights are raised to 1/T and renormalised (T > 1 flattens, T < 1 sharpens).
- Counts: largest-remainder allocation, so counts add up to `total` exactly and each domain's
  share is within 1/total of its target.
- Sampling: from each domain's TRAIN split only; without replacement, unless a domain has fewer
  items than its count: then every item once plus the rest drawn with replacement (recorded).
- Replay: `replay.fraction` of the output is drawn from the items of the `replay.from_stage`
  mixture, so that stage's mixture must be built first (see `stage_order`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.config import TRAINING_STAGES, MixtureConfig
from posttrain.data.domains import Record, is_verifiable, preference_replies
from posttrain.data.formats import canonical_json, decode_messages, full_conversation, is_conversational
from posttrain.errors import DataError

FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    # `conversation`: a conversational record's whole conversation (canonical JSON), which language
    # modelling renders through the chat template, as the chat model sees it; "" for plain text.
    "text": ("id", "domain", "text", "conversation"),
    "prompt_completion": ("id", "domain", "prompt", "completion"),
    "preference": ("id", "domain", "prompt", "chosen", "rejected", "answer", "verifier"),
    "prompt_answer": ("id", "domain", "prompt", "answer", "verifier"),
    # TRL's conversational SFT format: `messages` holds the canonical JSON of the whole conversation.
    "conversational": ("id", "domain", "messages"),
}


def tempered_proportions(weights: Mapping[str, float], temperature: float) -> dict[str, float]:
    """weights^(1/T), renormalised; zero-weight domains are dropped."""
    powered = {d: w ** (1.0 / temperature) for d, w in weights.items() if w > 0}
    total = sum(powered.values())
    if total <= 0:
        raise DataError(f"mixture weights {dict(weights)} are all zero; expected at least one weight > 0")
    return {d: p / total for d, p in powered.items()}


def allocate(total: int, proportions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder (Hamilton) allocation: integer counts summing exactly to `total`.

    Ties in the remainder go to the domain named first in sorted order, so the result is fixed.
    """
    quotas = {d: total * p for d, p in proportions.items()}
    counts = {d: int(q) for d, q in quotas.items()}
    left = total - sum(counts.values())
    by_remainder = sorted(quotas, key=lambda d: (-(quotas[d] - counts[d]), d))
    for d in by_remainder[:left]:
        counts[d] += 1
    return counts


def sample_items(items: Sequence[Record], k: int, rng: random.Random) -> tuple[list[Record], int]:
    """k items from `items`; returns (sample, how many were drawn with replacement)."""
    if k <= len(items):
        return rng.sample(list(items), k), 0
    # Not enough: use every item once, then draw the remainder with replacement.
    extra = k - len(items)
    return rng.sample(list(items), len(items)) + rng.choices(list(items), k=extra), extra


def stage_order(mixtures: Mapping[str, MixtureConfig]) -> list[str]:
    """Stages ordered so that every replay source comes before the stages replaying it."""
    rank = {s: i for i, s in enumerate(TRAINING_STAGES)}
    pending = sorted(mixtures, key=lambda s: (rank.get(s, len(rank)), s))
    done: list[str] = []
    while pending:
        ready = [s for s in pending if not mixtures[s].replay or mixtures[s].replay.from_stage in done]
        if not ready:
            chain = ", ".join(f"{s} <- {mixtures[s].replay.from_stage}" for s in pending)
            raise DataError(
                f"mixtures: replay sources form a cycle ({chain}); expected each replay.from_stage to be built first"
            )
        done.append(ready[0])
        pending.remove(ready[0])
    return done


@dataclass
class Mixture:
    stage: str
    records: list[Record]  # the chosen items in output order (what a later stage may replay)
    rows: list[dict[str, str]]  # the records in the stage's format
    columns: tuple[str, ...]
    manifest: dict[str, Any] = field(default_factory=dict)


_NEEDS = {
    "prompt_completion": "items with prompt and answer (or completion)",
    "preference": "items with prompt and answer (or chosen/rejected pairs)",
    "prompt_answer": "items with prompt and answer",
    "conversational": "conversational items (messages; `chat: true` on a built-in domain)",
}


def _usable(fmt: str, record: Record) -> bool:
    """Whether a record can be a row of format `fmt` (text works for every record)."""
    has_prompt = bool(record["prompt"] or record["messages"])
    if fmt == "prompt_completion":
        return has_prompt and bool(record["answer"] or record["completion"])
    if fmt == "preference":
        return bool(record["chosen"]) or is_verifiable(record)
    if fmt == "conversational":
        return is_conversational(record)
    return fmt == "text" or is_verifiable(record)


def _check_rows(stage: str, fmt: str, records: list[Record]) -> bool:
    """Refuse records that cannot make `fmt` rows; returns whether the rows are conversational."""
    bad = Counter(r["domain"] for r in records if not _usable(fmt, r))
    if bad:
        raise DataError(
            f"mixtures.{stage}: format '{fmt}' needs {_NEEDS[fmt]}, but domain(s) {sorted(bad)} hold items "
            "without them; expected format 'text' or domains whose items fit the format"
        )
    if fmt == "text":
        return False
    kinds = {is_conversational(r) for r in records}
    if len(kinds) > 1:
        chat = sorted({r["domain"] for r in records if is_conversational(r)})
        plain = sorted({r["domain"] for r in records if not is_conversational(r)})
        raise DataError(
            f"mixtures.{stage}: mixes conversational domain(s) {chat} with plain domain(s) {plain}; "
            "expected one kind per mixture (set `chat: true` on the built-in domains)"
        )
    return kinds == {True}


def _format_rows(stage: str, fmt: str, records: list[Record], rng: random.Random) -> list[dict[str, str]]:
    """Rows of `fmt`. Conversational records give canonical JSON message lists in the prompt and
    answer columns (posttrain.data.formats.decode_messages turns them back into TRL's lists)."""
    chat = _check_rows(stage, fmt, records)

    def turn(text: str) -> str:
        return canonical_json([{"content": text, "role": "assistant"}]) if chat else text

    rows = []
    for r in records:
        prompt = r["messages"] if chat else r["prompt"]
        if fmt == "text":
            conversation = canonical_json(full_conversation(r)) if is_conversational(r) else ""
            rows.append({"id": r["id"], "domain": r["domain"], "text": r["text"], "conversation": conversation})
        elif fmt == "conversational":
            rows.append({"id": r["id"], "domain": r["domain"], "messages": canonical_json(full_conversation(r))})
        elif fmt == "prompt_completion":
            completion = r["completion"] or turn(r["answer"])
            rows.append({"id": r["id"], "domain": r["domain"], "prompt": prompt, "completion": completion})
        elif fmt == "preference":
            # The user's own pairs when the source has them; else the demonstrated reply against the same
            # reply ending in a plausible wrong answer.
            chosen, rejected = (r["chosen"], r["rejected"]) if r["chosen"] else map(turn, preference_replies(r, rng))
            rows.append(
                {
                    "id": r["id"],
                    "domain": r["domain"],
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "answer": r["answer"],
                    "verifier": r["verifier"],
                }
            )
        else:
            rows.append(
                {
                    "id": r["id"],
                    "domain": r["domain"],
                    "prompt": prompt,
                    "answer": r["answer"],
                    "verifier": r["verifier"],
                }
            )
    return rows


def _solved(fmt: str, row: dict[str, str], chat: bool) -> str | list[dict[str, str]]:
    """A row as worked context for a later item: its prompt followed by its (preferred) answer."""
    answer = {"prompt_completion": "completion", "preference": "chosen"}.get(fmt)
    if chat:
        reply = decode_messages(row[answer]) if answer else [{"content": row["answer"], "role": "assistant"}]
        return decode_messages(row["prompt"]) + reply
    return row["prompt"] + (row[answer] if answer else row["answer"])


def group_rows(fmt: str, rows: list[dict[str, str]], group: int, chat: bool) -> list[dict[str, str]]:
    """Join each run of `group` consecutive rows into one row (`mixtures.<stage>.group`).

    text: the texts, one per line; conversational: one multi-turn conversation; the prompt formats
    (prompt_completion, preference, prompt_answer): the earlier rows, solved, as few-shot context
    before the last row's prompt, whose completion / chosen and rejected / answer the row keeps. A
    grouped row's id is its first item's id + the number of items joined after it; its domain the last's.
    """
    if group == 1:
        return rows
    out = []
    for start in range(0, len(rows), group):
        chunk = rows[start : start + group]
        *context, last = chunk
        row = {**last, "id": f"{chunk[0]['id']}+{len(chunk) - 1}"}
        if fmt == "text":
            row["text"] = "\n".join(r["text"] for r in chunk)
        elif fmt == "conversational":
            row["messages"] = canonical_json([m for r in chunk for m in decode_messages(r["messages"])])
        elif chat:
            turns = [m for r in context for m in _solved(fmt, r, chat)]
            row["prompt"] = canonical_json(turns + decode_messages(last["prompt"]))
        else:
            row["prompt"] = "".join(f"{_solved(fmt, r, chat)}\n" for r in context) + last["prompt"]
        out.append(row)
    return out


def build_mixture(
    stage: str,
    config: MixtureConfig,
    train: Mapping[str, Sequence[Record]],
    built: Mapping[str, Mixture] | None = None,
) -> Mixture:
    """The mixture of `stage` from each domain's train records; `built` holds earlier mixtures (replay)."""
    built = built or {}
    replay_n = 0
    replay_records: list[Record] = []
    replay_repeats = 0
    if config.replay:
        source = built.get(config.replay.from_stage)
        if source is None:
            raise DataError(
                f"mixtures.{stage}.replay.from_stage: mixture {config.replay.from_stage!r} is not built yet"
            )
        replay_n = round(config.total * config.group * config.replay.fraction)
        # String seeds are hashed with sha512 by `random`: stable across runs and Python versions.
        replay_rng = random.Random(f"{config.seed}:{stage}:replay")
        replay_records, replay_repeats = sample_items(source.records, replay_n, replay_rng)
    own_n = config.total * config.group - replay_n  # items: `group` of them make one row

    targets = tempered_proportions(config.weights, config.temperature)
    counts = allocate(own_n, targets)
    chosen: list[Record] = []
    with_replacement: dict[str, int] = {}
    for domain in sorted(counts):
        items = train.get(domain)
        if items is None:
            raise DataError(f"mixtures.{stage}.weights.{domain}: no prepared data for domain {domain!r}")
        if counts[domain] and not items:
            raise DataError(
                f"mixtures.{stage}.weights.{domain}: the domain's train split is empty; "
                "expected items (more n_items, or a smaller val/test fraction)"
            )
        # One rng per domain: changing one domain's count leaves the others' picks as they were.
        sample, repeats = sample_items(items, counts[domain], random.Random(f"{config.seed}:{stage}:{domain}"))
        if repeats:
            with_replacement[domain] = repeats
        chosen.extend(sample)

    rng = random.Random(f"{config.seed}:{stage}:shuffle")
    records = chosen + replay_records
    rng.shuffle(records)
    rows = _format_rows(stage, config.format, records, random.Random(f"{config.seed}:{stage}:rejected"))
    chat = config.format != "text" and any(is_conversational(r) for r in records)
    rows = group_rows(config.format, rows, config.group, chat)

    replay_counts = dict(sorted(Counter(r["domain"] for r in replay_records).items()))
    output_counts = dict(sorted(Counter(r["domain"] for r in records).items()))
    manifest = {
        "stage": stage,
        "format": config.format,
        "columns": list(FORMAT_COLUMNS[config.format]),
        # Conversational rows hold canonical JSON message lists (posttrain.data.formats).
        "conversational": config.format == "conversational" or any(is_conversational(r) for r in records)
        if config.format != "text"
        else False,
        "seed": config.seed,
        "total": len(rows),
        "weights": dict(config.weights),
        "temperature": config.temperature,
        # Online mixing re-draws the rows during training (the training stage records what it saw).
        "adaptive": config.adaptive.model_dump() if config.adaptive else None,
        "target_proportions": {d: round(p, 6) for d, p in sorted(targets.items())},
        "counts": dict(sorted(counts.items())),
        "effective_proportions": {d: round(c / own_n, 6) if own_n else 0.0 for d, c in sorted(counts.items())},
        "with_replacement": with_replacement,
        "available_train_items": {d: len(train[d]) for d in sorted(counts)},
        "replay": {
            "from_stage": config.replay.from_stage,
            "fraction": config.replay.fraction,
            "items": replay_n,
            "counts": replay_counts,
            "with_replacement": replay_repeats,
        }
        if config.replay
        else None,
        "output_counts": output_counts,
        "output_proportions": {d: round(c / len(records), 6) for d, c in output_counts.items()} if records else {},
        "ids": [r["id"] for r in records],
    }
    if config.group > 1:  # only then: a group-1 manifest stays byte-identical to those written before the key existed
        manifest["group"] = config.group
    return Mixture(stage=stage, records=records, rows=rows, columns=FORMAT_COLUMNS[config.format], manifest=manifest)
