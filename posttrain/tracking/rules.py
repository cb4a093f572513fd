"""The promotion rules: pure functions over `EvalReport`s (posttrain.scoring.report), no MLflow.

`posttrain.tracking.registry` is the adapter: it finds the reports (the workspace's eval.json, or the
evaluate run's copy of it for a registered version) and applies the verdict to the registry.

Candidate (`promotion.candidate`): a named stage, or the best of several evaluated stages on a metric
(`mean`: exact match averaged over the stage's domains; ties go to the earlier stage). Unset:
`promotion.final_stage`.

Every comparison is a difference of exact match d = candidate - other on one domain, with an interval
[low, high]: a paired percentile bootstrap over the test items when both were scored on the same items
(one report, or two reports of the same prepared data), else the two CIs' facing sides combined in
quadrature. The models compared are this run's, scored on one set of test items: the items are the
uncertainty. With `promotion.seed_spread` (and a seed sweep, `posttrain seeds N`) the interval is also
widened on both sides by the standard deviation over seeds of that same difference: the rules then judge
the recipe ("would another seed's run be this good?"), not only the models at hand. Each check is pass,
fail or inconclusive:

- thresholds: `min_exact_match[domain]` and `max_forgetting[domain]` on the candidate's own scores;
- lineage: against every evaluated model it descends from, on each gated domain, with the margin
  m = `max_regression` (per domain: `max_regression_per_domain`): pass when low >= -m (not worse by m),
  fail when high < 0 and low < -m (worse beyond noise, possibly by more than m), else inconclusive:
  the data cannot tell a regression of m from noise, and the check says what would (items, seeds);
- learning (`require_learning`): better than the first evaluated model of its lineage (the base) on at
  least one domain, low > 0; a chain that learned nothing is never promoted;
- champion (`compare_domain`, when a champion exists): pass when low > `min_improvement`, fail when
  high <= `min_improvement`, else inconclusive; evaluations by different generation engines are not
  compared unless `allow_engine_mismatch`.

The verdict: promote when every check passes; refuse when any fails; inconclusive otherwise, which
refuses unless `on_inconclusive: promote`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from posttrain.config import PromotionConfig
from posttrain.errors import PromotionError
from posttrain.scoring.intervals import bootstrap_indices, percentile_ci
from posttrain.scoring.report import EvalReport, Score

Status = Literal["pass", "fail", "inconclusive"]


@dataclass
class Check:
    name: str
    status: Status
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@dataclass
class Verdict:
    """promote | refuse | inconclusive, with every check behind it."""

    status: Literal["promote", "refuse", "inconclusive"]
    checks: list[Check] = field(default_factory=list)

    @property
    def promote(self) -> bool:
        return self.status == "promote"

    def reasons(self) -> str:
        return "; ".join(f"{g.name}: {g.detail}" for g in self.checks if not g.passed)


def decide(checks: list[Check], promotion: PromotionConfig) -> Verdict:
    if any(g.status == "fail" for g in checks):
        return Verdict("refuse", checks)
    if any(g.status == "inconclusive" for g in checks):
        return Verdict("promote" if promotion.on_inconclusive == "promote" else "inconclusive", checks)
    return Verdict("promote", checks)


# --------------------------------------------------------------------------- the candidate


def candidate_stage(promotion: PromotionConfig, report: EvalReport | None) -> tuple[str, str]:
    """(stage, why) of the promotion candidate by `promotion.candidate`; the report is needed for best_of."""
    rule = promotion.candidate
    if rule is None:
        return promotion.final_stage, "promotion.final_stage"
    if rule.stage is not None:
        return rule.stage, "promotion.candidate.stage"
    assert rule.best_of is not None  # the config allows exactly one of stage / best_of
    if report is None:
        raise PromotionError("promotion.candidate.best_of needs artifacts/metrics/eval.json; run evaluate first")
    values = {stage: report.metric(stage, rule.metric) for stage in rule.best_of}
    scored = {stage: value for stage, value in values.items() if value is not None}
    if not scored:
        raise PromotionError(
            f"promotion.candidate.best_of: none of {rule.best_of} has a '{rule.metric}' exact match in eval.json; "
            "add them to evaluate.models"
        )
    best = max(scored, key=lambda stage: (scored[stage], -rule.best_of.index(stage)))
    shown = ", ".join(f"{s}={v:.4f}" if v is not None else f"{s}=not evaluated" for s, v in values.items())
    return best, f"best of promotion.candidate.best_of on {rule.metric} ({shown})"


# --------------------------------------------------------------------------- differences


@dataclass
class Difference:
    """d = candidate - other on one domain, its interval, and where the interval's width comes from."""

    value: float
    low: float
    high: float
    paired: bool
    n: int | None  # test items behind each score
    sampling_half: float  # half-width from the test items alone (bootstrap or quadrature)
    spread: float = 0.0  # seed standard deviation added on both sides

    def shown(self) -> str:
        how = "paired bootstrap" if self.paired else "CIs in quadrature"
        seeds = f" + seed spread {self.spread:.4f}" if self.spread else ""
        return f"{self.value:+.4f} [{self.low:+.4f}, {self.high:+.4f}] ({how}{seeds}, n={self.n})"

    def advice(self, margin: float) -> str:
        """What would make an interval this wide narrow enough to tell a difference of `margin`."""
        parts = []
        if self.n and self.sampling_half > 0:
            parts.append(
                f"about {math.ceil(self.n * (self.sampling_half / margin) ** 2)} test items per domain (now {self.n})"
            )
        if self.spread >= margin:
            parts.append(
                f"scores averaged over about {math.ceil((self.spread / margin) ** 2)} seeds (seed spread {self.spread:.4f})"
            )
        return " and ".join(parts) or "more test items or seeds"


def _bits(correct: str) -> np.ndarray:
    return np.frombuffer(correct.encode(), dtype=np.uint8) == ord("1")


def difference(
    c_report: EvalReport, c_stage: str, a_report: EvalReport, a_stage: str, domain: str, spread: float = 0.0
) -> Difference | None:
    """The candidate's exact match minus the other's on `domain` (None: either has no score there)."""
    c, a = c_report.exact_match(c_stage).get(domain), a_report.exact_match(a_stage).get(domain)
    if c is None or a is None:
        return None
    value = c.mean - a.mean
    c_items, a_items = c_report.correct(c_stage, domain), a_report.correct(a_stage, domain)
    same_items = c_report is a_report or (
        c_report.prepared_manifest_hash is not None
        and c_report.prepared_manifest_hash == a_report.prepared_manifest_hash
    )
    if same_items and c_items and a_items and len(c_items) == len(a_items):
        samples, confidence, seed = c_report.bootstrap
        index = bootstrap_indices(len(c_items), samples, seed)
        diffs = _bits(c_items)[index].mean(axis=1) - _bits(a_items)[index].mean(axis=1)
        low, high = percentile_ci(diffs, confidence)
        half = max(value - low, high - value)
        return Difference(value, low - spread, high + spread, True, len(c_items), half, spread)
    low_half = math.hypot(_below(c), _above(a))
    high_half = math.hypot(_above(c), _below(a))
    return Difference(
        value, value - low_half - spread, value + high_half + spread, False, c.n, max(low_half, high_half), spread
    )


def _below(score: Score) -> float:
    # A missing interval counts as zero width (a point estimate): stricter data gives a fairer test.
    return score.mean - score.ci_low if score.ci_low is not None else 0.0


def _above(score: Score) -> float:
    return score.ci_high - score.mean if score.ci_high is not None else 0.0


# --------------------------------------------------------------------------- checks


def threshold_checks(promotion: PromotionConfig, report: EvalReport, stage: str) -> list[Check]:
    """`min_exact_match` and `max_forgetting` on the candidate's own scores."""
    exact = report.exact_match(stage)
    model = report.model(stage)
    forgetting = {d: _forgetting_value(v) for d, v in (model.forgetting if model else {}).items()}
    checks = []
    for domain, threshold in sorted(promotion.min_exact_match.items()):
        score = exact.get(domain)
        if score is None:
            checks.append(Check(f"min_exact_match.{domain}", "fail", f"no exact-match score for domain '{domain}'"))
        else:
            status: Status = "pass" if score.mean >= threshold else "fail"
            checks.append(Check(f"min_exact_match.{domain}", status, f"{score.mean:.4f} (needs >= {threshold})"))
    for domain, threshold in sorted(promotion.max_forgetting.items()):
        value = forgetting.get(domain)
        if value is None:
            checks.append(Check(f"max_forgetting.{domain}", "fail", f"no forgetting score for domain '{domain}'"))
        else:
            status = "pass" if value <= threshold else "fail"
            checks.append(Check(f"max_forgetting.{domain}", status, f"{value:.4f} (needs <= {threshold})"))
    return checks


def _forgetting_value(value: Any) -> float | None:
    if isinstance(value, Mapping):
        value = value.get("value")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


SpreadFn = Any  # (candidate stage, other stage, domain) -> seed std of the difference, or None


def lineage_checks(
    promotion: PromotionConfig, report: EvalReport, stage: str, spread: SpreadFn | None = None
) -> list[Check]:
    """One check per (evaluated ancestor, gated domain): not worse than it by `max_regression`."""
    model = report.model(stage)
    if model is None or not report.exact_match(stage):
        return [
            Check("lineage", "fail", f"'{stage}' has no exact-match scores in eval.json; add it to evaluate.models")
        ]
    checks: list[Check] = []
    for ancestor in model.lineage:
        name = ancestor.stage
        scores = report.exact_match(name)
        if not scores:
            continue  # not evaluated: nothing to compare with (the rule covers evaluated ancestors)
        relation = "parent" if ancestor.via == stage else f"ancestor via {ancestor.via}"
        evaluated = report.models[name].content_hash
        if ancestor.content_hash and evaluated and evaluated != ancestor.content_hash:
            detail = (
                f"{relation} '{name}' was evaluated at content {evaluated[:12]} but the candidate descends from "
                f"{ancestor.content_hash[:12]}; rerun evaluate"
            )
            checks.append(Check(f"not_worse_than.{name}", "fail", detail))
            continue
        for domain in promotion.lineage_domains or sorted(set(report.exact_match(stage)) & set(scores)):
            check = f"not_worse_than.{name}.{domain}"
            seed_std = (spread(stage, name, domain) if spread else None) or 0.0
            d = difference(report, stage, report, name, domain, seed_std)
            if d is None:
                checks.append(Check(check, "fail", f"no '{domain}' exact match for the candidate or for '{name}'"))
                continue
            margin = promotion.regression_margin(domain)
            shown = f"{relation} '{name}' on {domain}: difference {d.shown()}, margin {margin}"
            if d.low >= -margin:
                checks.append(Check(check, "pass", f"{shown}: not worse by the margin"))
            elif d.high < 0:
                checks.append(Check(check, "fail", f"{shown}: worse beyond noise, possibly by more than the margin"))
            else:
                checks.append(
                    Check(
                        check,
                        "inconclusive",
                        f"{shown}: the data cannot tell a regression of {margin} from noise; "
                        f"that needs {d.advice(margin)}",
                    )  # fmt: skip
                )
    if not checks:
        checks.append(Check("lineage", "pass", f"no evaluated model in the lineage of '{stage}'"))
    return checks


def learning_check(promotion: PromotionConfig, report: EvalReport, stage: str) -> list[Check]:
    """Better than the base (the first evaluated model of its lineage) on at least one domain, beyond noise."""
    if not promotion.require_learning:
        return []
    model = report.model(stage)
    evaluated = [a.stage for a in (model.lineage if model else []) if report.exact_match(a.stage)]
    if not evaluated:
        return [
            Check(
                "learned",
                "inconclusive",
                f"no evaluated model in the lineage of '{stage}' to show it learned "
                "anything; add its base (e.g. pretrain) to evaluate.models",
            )  # fmt: skip
        ]
    base = evaluated[-1]
    shown = []
    for domain in sorted(set(report.exact_match(stage)) & set(report.exact_match(base))):
        d = difference(report, stage, report, base, domain)
        if d is None:
            continue
        if d.low > 0:
            return [Check("learned", "pass", f"better than the base '{base}' on {domain}: {d.shown()}")]
        shown.append(f"{domain} {d.shown()}")
    return [
        Check(
            "learned",
            "fail",
            f"not better than the base '{base}' on any domain beyond noise ({'; '.join(shown)}): "
            "the chain learned nothing measurable",
        )  # fmt: skip
    ]


@dataclass
class Champion:
    """The served model as the champion check sees it: its version, stage and evaluation report."""

    version: str
    stage: str
    report: EvalReport | None


def champion_check(
    promotion: PromotionConfig,
    report: EvalReport,
    stage: str,
    champion: Champion | None,
    seed_std: float | None = None,
) -> list[Check]:
    """The candidate beats the current champion on `compare_domain` by more than `min_improvement`."""
    domain = promotion.compare_domain
    if not domain:
        return []
    name = f"beats_champion.{domain}"
    if champion is None:
        return [Check(name, "pass", "no champion yet: the first champion is judged on its own scores and lineage")]
    if champion.report is None or champion.stage not in champion.report.models:
        return [Check(name, "fail", f"champion v{champion.version} has no evaluation to compare with; evaluate it")]
    engines = report.engine_of(stage), champion.report.engine_of(champion.stage)
    if engines[0] != engines[1] and not promotion.allow_engine_mismatch:
        return [
            Check(
                name,
                "fail",
                f"the candidate was evaluated with engine {engines[0]!r}, champion v{champion.version} "
                f"with {engines[1]!r}: scores of different engines are not compared (set "
                "promotion.allow_engine_mismatch, or evaluate both with one engine)",
            )  # fmt: skip
        ]
    d = difference(report, stage, champion.report, champion.stage, domain, seed_std or 0.0)
    if d is None:
        return [Check(name, "fail", f"the candidate or champion v{champion.version} has no '{domain}' score")]
    target = promotion.min_improvement
    shown = f"candidate - champion v{champion.version} ({champion.stage}) = {d.shown()}, needs > {target}"
    if report.prepared_manifest_hash != champion.report.prepared_manifest_hash:
        shown += "; the two were scored on different prepared data"
    if d.low > target:
        return [Check(name, "pass", shown)]
    if d.high <= target:
        return [Check(name, "fail", f"{shown}: not better")]
    return [Check(name, "inconclusive", f"{shown}: cannot tell; that needs {d.advice(max(abs(d.value), 0.01))}")]


def checks_for(
    promotion: PromotionConfig,
    report: EvalReport,
    stage: str,
    champion: Champion | None = None,
    spread: SpreadFn | None = None,
    seed_std: float | None = None,
) -> list[Check]:
    """Every check of the rule for `stage` in `report`, in the order they are printed."""
    if report.model(stage) is None:
        return [Check("evaluated", "fail", f"'{stage}' has no evaluation scores; run the evaluate stage first")]
    checks = [Check("evaluated", "pass", f"scores of '{stage}' in eval.json")]
    checks += threshold_checks(promotion, report, stage)
    checks += learning_check(promotion, report, stage)
    checks += lineage_checks(promotion, report, stage, spread)
    checks += champion_check(promotion, report, stage, champion, seed_std)
    return checks
