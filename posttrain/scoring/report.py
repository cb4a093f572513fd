"""`EvalReport`: eval.json as one typed object, read and written here and nowhere else.

The `evaluate` stage builds the document (posttrain.scoring.evaluation.build_report) and writes it with
`write_report`; the promotion rules, the registry, the seed sweep and the plots read it with
`read_report` / `EvalReport.parse`. Schema and definitions: docs/eval-schema.md. Unknown keys are kept
(an added key does not break an older reader), so the typed fields are what the readers use.

Per model it carries what a comparison needs without any other file: each domain's exact match with
its bootstrap CI and the per-item results (`correct`, one '1'/'0' per test item, so that two models
scored on the same items can be compared *paired*), the model's content hash and its lineage (every
model it descends from, nearest first, with the content hash it descends from), and the generation
engine that produced the answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from posttrain.errors import PromotionError
from posttrain.io import write_json_atomic
from posttrain.layout import Layout
from posttrain.lineage import read_lineage

SCHEMA_VERSION = 1
DEFAULT_ENGINE = "hf"  # eval.json written before engines were recorded came from plain `generate`


class _Open(BaseModel):
    """Typed fields, unknown keys kept (eval.json grows; an older reader must not fail on a new key)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Score(_Open):
    mean: float
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None


class DomainResult(_Open):
    n_items: int | None = None
    exact_match: Score | None = None
    # One character per test item, '1' where the verifier accepted the greedy answer (paired comparisons).
    correct: str | None = None


class Ancestor(_Open):
    stage: str
    content_hash: str | None = None
    via: str  # the model whose lineage.json names it as a parent


class ModelResult(_Open):
    path: str | None = None
    content_hash: str | None = None
    # Every model this one descends from, nearest first (walked through the lineage.json files).
    lineage: list[Ancestor] = []
    # How its answers were generated: {engine, generated_tokens, seconds, tokens_per_second}.
    generation: dict[str, Any] = {}
    domains: dict[str, DomainResult] = {}
    forgetting: dict[str, Any] = {}


class EvalReport(_Open):
    schema_version: int = SCHEMA_VERSION
    # The generation engine every model was scored with: {engine} (posttrain.scoring.engines).
    generation: dict[str, Any] = {}
    config: dict[str, Any] = {}
    stages: list[str] = []
    domains: list[str] = []
    models: dict[str, ModelResult] = {}
    # sha256 of artifacts/data/prepared/manifest.json: two reports on the same items share it.
    prepared_manifest_hash: str | None = None

    @classmethod
    def parse(cls, data: Any, where: str = "eval.json") -> EvalReport:
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            location = ".".join(str(part) for part in first["loc"])
            raise PromotionError(
                f"{where}: not an evaluation report ({location}: {first['msg']}); expected the schema of "
                "docs/eval-schema.md, as the evaluate stage writes it"
            ) from None

    def model(self, stage: str) -> ModelResult | None:
        return self.models.get(stage)

    def exact_match(self, stage: str) -> dict[str, Score]:
        """{domain: exact match} of `stage` (domains without an exact match left out; empty if not evaluated)."""
        entry = self.models.get(stage)
        if entry is None:
            return {}
        return {d: r.exact_match for d, r in entry.domains.items() if r.exact_match is not None}

    def correct(self, stage: str, domain: str) -> str | None:
        entry = self.models.get(stage)
        result = entry.domains.get(domain) if entry else None
        return result.correct if result else None

    def engine_of(self, stage: str) -> str:
        """The generation engine that produced `stage`'s answers (`hf` for reports from before engines)."""
        entry = self.models.get(stage)
        own = entry.generation.get("engine") if entry else None
        return own or self.generation.get("engine") or DEFAULT_ENGINE

    def metric(self, stage: str, metric: str) -> float | None:
        """A domain's exact match, or `mean`: exact match averaged over the domains the stage was scored on."""
        scores = self.exact_match(stage)
        if metric == "mean":
            return sum(s.mean for s in scores.values()) / len(scores) if scores else None
        return scores[metric].mean if metric in scores else None

    @property
    def bootstrap(self) -> tuple[int, float, int]:
        """(samples, confidence, seed) the report's intervals were computed with."""
        return (
            int(self.config.get("bootstrap_samples", 1000)),
            float(self.config.get("confidence", 0.95)),
            int(self.config.get("seed", 0)),
        )


def read_report(path: Path) -> EvalReport | None:
    """The report at `path` (artifacts/metrics/eval.json); None when the evaluate stage has not run."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PromotionError(f"{path} is not valid JSON ({error})") from None
    return EvalReport.parse(data, str(path))


def workspace_report(layout: Layout) -> EvalReport | None:
    """The workspace's eval.json. One written before reports carried lineage gets it from the lineage.json
    files of the workspace's model folders (what the evaluate stage now records itself)."""
    report = read_report(layout.metrics("eval"))
    if report is None or all(m.lineage for m in report.models.values()):
        return report
    models = {}
    for stage, model in report.models.items():
        walked = model.lineage or [Ancestor(**a) for a in lineage_of(layout, layout.model(stage))]
        models[stage] = model.model_copy(update={"lineage": walked})
    return report.model_copy(update={"models": models})


def write_report(path: Path, document: dict[str, Any]) -> EvalReport:
    """Check `document` against the schema, then write it atomically; returns it typed."""
    report = EvalReport.parse(document, str(path))
    write_json_atomic(path, document)
    return report


def lineage_of(layout: Layout, model_dir: Path) -> list[dict[str, Any]]:
    """Every model `model_dir` descends from, nearest first: {stage, content_hash, via} (from lineage.json files)."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    frontier = [(model_dir, None)]
    while frontier:
        folder, child = frontier.pop(0)
        record = read_lineage(folder) or {}
        for parent in record.get("parents") or []:
            name = parent.get("stage")
            if not name or name in seen:
                continue
            seen.add(name)
            found.append(
                {"stage": name, "content_hash": parent.get("content_hash"), "via": child or record.get("stage")}
            )
            path = layout.root / parent["path"] if parent.get("path") else layout.model(name)
            frontier.append((path, name))
    return found
