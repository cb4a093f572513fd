"""The promotion candidate and the lineage gate, read from the workspace's files (no MLflow).

Candidate (`promotion.candidate`): a named stage (`{stage: merge}`), or the best of several
evaluated stages on one metric (`{best_of: [sft, merge], metric: mean}`; `mean` is exact match
averaged over the domains the stage was evaluated on; ties go to the earlier stage in the list).
Unset: `promotion.final_stage`.

Lineage gate: the candidate is compared with every model of its own lineage that `evaluate`
scored: its parents in `lineage.json`, their parents, and so on (a merge has several). On each
gated domain (`promotion.lineage_domains`, or every domain both were scored on) it is refused when

    mean_c - mean_a < -(sqrt(half_c^2 + half_a^2) + spread[domain])

with half_c = ci_high_c - mean_c and half_a = mean_a - ci_low_a (the two intervals' sides that face
each other, combined in quadrature: independent samples) and `spread` an optional per-domain
seed standard deviation (seed results, where they exist). A worse score inside that noise passes.
An ancestor whose evaluation is stale (its content hash in eval.json differs from the one its child
recorded) fails the gate: a regression could not be ruled out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from posttrain.config import Params
from posttrain.errors import PromotionError
from posttrain.layout import Layout
from posttrain.lineage import read_lineage

EVAL_FILE = "eval.json"


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str


def read_eval(layout: Layout) -> dict[str, Any] | None:
    """artifacts/metrics/eval.json (docs/eval-schema.md); None when the evaluate stage has not run."""
    path = layout.metrics("eval")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PromotionError(f"{path} is not valid JSON ({error})") from None


def exact_match(eval_data: dict[str, Any], stage: str) -> dict[str, dict[str, Any]]:
    """{domain: {mean, ci_low, ci_high, n}} of `stage` in eval.json; domains without exact match left out."""
    domains = ((eval_data.get("models") or {}).get(stage) or {}).get("domains") or {}
    return {d: v["exact_match"] for d, v in domains.items() if isinstance(v, dict) and v.get("exact_match")}


def _metric(scores: dict[str, dict[str, Any]], metric: str) -> float | None:
    if metric == "mean":
        return sum(s["mean"] for s in scores.values()) / len(scores) if scores else None
    return scores[metric]["mean"] if metric in scores else None


def candidate_stage(params: Params, eval_data: dict[str, Any] | None) -> tuple[str, str]:
    """(stage, why) of the promotion candidate by `promotion.candidate`; eval.json is needed for best_of."""
    rule = params.promotion.candidate
    if rule is None:
        return params.promotion.final_stage, "promotion.final_stage"
    if rule.stage is not None:
        return rule.stage, "promotion.candidate.stage"
    assert rule.best_of is not None  # the config allows exactly one of stage / best_of
    if eval_data is None:
        raise PromotionError("promotion.candidate.best_of needs artifacts/metrics/eval.json; run evaluate first")
    values = {stage: _metric(exact_match(eval_data, stage), rule.metric) for stage in rule.best_of}
    scored = {stage: value for stage, value in values.items() if value is not None}
    if not scored:
        raise PromotionError(
            f"promotion.candidate.best_of: none of {rule.best_of} has a '{rule.metric}' exact match in eval.json; "
            "add them to evaluate.models"
        )
    best = max(scored, key=lambda stage: (scored[stage], -rule.best_of.index(stage)))
    shown = ", ".join(f"{s}={v:.4f}" if v is not None else f"{s}=not evaluated" for s, v in values.items())
    return best, f"best of promotion.candidate.best_of on {rule.metric} ({shown})"


def ancestors(layout: Layout, stage: str) -> list[dict[str, Any]]:
    """Every model the `stage` model descends from, nearest first: {stage, path, content_hash, via}."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    frontier = [(layout.model(stage), stage)]
    while frontier:
        model_dir, child = frontier.pop(0)
        for parent in (read_lineage(model_dir) or {}).get("parents") or []:
            name = parent.get("stage")
            if not name or name in seen:
                continue
            seen.add(name)
            found.append({**parent, "via": child})
            path = layout.root / parent["path"] if parent.get("path") else layout.model(name)
            frontier.append((path, name))
    return found


def _compare(domain: str, c: dict[str, Any], a: dict[str, Any], spread: float) -> tuple[bool, str]:
    # A missing interval counts as zero width: the comparison gets stricter, never looser.
    half_c = c["ci_high"] - c["mean"] if c.get("ci_high") is not None else 0.0
    half_a = a["mean"] - a["ci_low"] if a.get("ci_low") is not None else 0.0
    tolerance = math.sqrt(half_c**2 + half_a**2) + spread
    diff = c["mean"] - a["mean"]
    detail = f"{domain}: candidate {c['mean']:.4f} vs {a['mean']:.4f}, difference {diff:+.4f} (refused below "
    detail += f"-{tolerance:.4f} = CIs" + (f" + seed spread {spread:.4f})" if spread else ")")
    return diff >= -tolerance, detail


def lineage_gates(
    params: Params,
    layout: Layout,
    stage: str,
    eval_data: dict[str, Any] | None,
    spread: dict[str, float] | None = None,
) -> list[Gate]:
    """One gate per (evaluated ancestor, gated domain): the rule of this module's docstring."""
    if eval_data is None:
        return [Gate("lineage", False, f"{layout.metrics('eval')} does not exist; run the evaluate stage first")]
    candidate = exact_match(eval_data, stage)
    if not candidate:
        return [Gate("lineage", False, f"'{stage}' has no exact-match scores in eval.json; add it to evaluate.models")]
    models = eval_data.get("models") or {}
    wanted = params.promotion.lineage_domains
    gates: list[Gate] = []
    for parent in ancestors(layout, stage):
        name = parent["stage"]
        scores = exact_match(eval_data, name)
        if not scores:
            continue  # not evaluated: nothing to compare with (the rule covers evaluated ancestors)
        relation = "parent" if parent["via"] == stage else f"ancestor via {parent['via']}"
        evaluated = models[name].get("content_hash")
        if parent.get("content_hash") and evaluated and evaluated != parent["content_hash"]:
            gates.append(
                Gate(
                    f"not_worse_than.{name}",
                    False,
                    f"{relation} '{name}' was evaluated at content {evaluated[:12]} but the candidate descends from "
                    f"{parent['content_hash'][:12]}; rerun evaluate",
                )
            )
            continue
        for domain in wanted or sorted(set(candidate) & set(scores)):
            gate = f"not_worse_than.{name}.{domain}"
            if domain not in candidate or domain not in scores:
                gates.append(Gate(gate, False, f"no '{domain}' exact match for the candidate or for '{name}'"))
                continue
            passed, detail = _compare(domain, candidate[domain], scores[domain], (spread or {}).get(domain, 0.0))
            gates.append(Gate(gate, passed, f"{relation} '{name}': {detail}"))
    if not gates:
        gates.append(Gate("lineage", True, f"no evaluated model in the lineage of '{stage}'"))
    return gates
