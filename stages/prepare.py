"""Stage `prepare`: build every domain, split it, decontaminate, write the prepared data.

    artifacts/data/prepared/<domain>/{train,val,test}.parquet   record schema (docs/design.md)
    artifacts/data/prepared/manifest.json                       counts, hashes, sources, verifiers,
                                                                decontamination report
    artifacts/metrics/prepare.json                              counts and seconds

Reads only `data` from params.yaml (the params dvc.yaml declares for this stage).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from posttrain import io
from posttrain.config import DataConfig, DomainConfig, Params
from posttrain.data import decontamination, domains, lore, sources, splits, userdeps
from posttrain.data.domains import Record
from posttrain.errors import DataError
from posttrain.layout import Layout
from posttrain.pipeline.entry import stage_main
from posttrain.stage import StageResult

log = logging.getLogger("posttrain.prepare")


def build_domain(
    name: str, config: DomainConfig, data: DataConfig, layout: Layout
) -> tuple[list[Record], dict[str, Any]]:
    """All records of one domain and a description of where they came from."""
    if config.kind == "lore":
        records = lore.generate(name, config.form, data.seed, config.world, config.entities, config.chat,
                                config.verifier or "exact")  # fmt: skip
        return records, {
            "kind": "lore",
            "generator": config.model_dump(exclude={"kind", "verifier"}),
            "produced": len(records),
        }
    if config.kind in domains.GENERATOR_KINDS:
        records = domains.generate(name, config, data.seed, config.verifier)
        knobs = config.model_dump(exclude={"kind", "verifier", "n_items"})
        source = {"kind": config.kind, "generator": knobs, "requested": config.n_items, "produced": len(records)}
        return records, source
    if config.kind == "file":
        records, report = sources.load_file(name, config, layout.root, config.verifier or "exact")
    else:
        records, report = sources.load_hub(name, config, config.verifier or "exact")
    return records, {"kind": config.kind, **report.as_dict()}


def prepare(data: DataConfig, layout: Layout) -> dict[str, Any]:
    """Build, split, decontaminate and write all domains; returns the manifest."""
    by_domain: dict[str, dict[str, list[Record]]] = {}
    described: dict[str, dict[str, Any]] = {}
    empty: list[str] = []
    for name, config in data.domains.items():
        started = time.perf_counter()
        records, source = build_domain(name, config, data, layout)
        parts = splits.split_records(records, data.split.salt, data.split.val_fraction, data.split.test_fraction)
        by_domain[name] = parts
        described[name] = source
        counts = {s: len(parts[s]) for s in splits.SPLITS}
        log.info(
            "domain %s: %d items (%s) in %.2f s",
            name,
            len(records),
            ", ".join(f"{s} {n}" for s, n in counts.items()),
            time.perf_counter() - started,
        )
        fractions = {"val": data.split.val_fraction, "test": data.split.test_fraction}
        for split, fraction in fractions.items():
            if fraction > 0 and not parts[split]:
                empty.append(
                    f"domain {name}: {split} split is empty ({len(records)} items in all, "
                    f"data.split.{split}_fraction = {fraction}); add items to the domain or raise the fraction"
                )

    report = decontamination.decontaminate(
        by_domain,
        data.decontamination.ngram,
        data.decontamination.max_overlap,
        data.decontamination.max_leaked_fraction,
    )
    if empty:
        # Refused here, not later: DPO, GRPO and evaluation fail on an empty split after training.
        raise DataError("; ".join(empty))
    log.info(
        "decontamination: %d val/test items checked, %d leaked, highest n-gram overlap %.2f",
        report["checked"],
        report["leaked"],
        report["max_overlap_seen"],
    )

    manifest: dict[str, Any] = {
        "seed": data.seed,
        "split": data.split.model_dump(),
        "columns": list(domains.RECORD_COLUMNS),
        "domains": {},
        "decontamination": report,
    }
    with io.atomic_output_dir(layout.prepared) as tmp:
        for name, parts in by_domain.items():
            hashes = {
                split: io.write_parquet(parts[split], tmp / name / f"{split}.parquet", domains.RECORD_COLUMNS)
                for split in splits.SPLITS
            }
            verifiers = sorted({r["verifier"] for split in parts.values() for r in split})
            manifest["domains"][name] = {
                "source": described[name],
                "verifier": verifiers[0] if len(verifiers) == 1 else verifiers,
                "counts": {s: len(parts[s]) for s in splits.SPLITS},
                "content_hashes": hashes,
            }
        io.write_json(manifest, tmp / "manifest.json")
    return manifest


def run(params: Params, layout: Layout) -> StageResult:
    started = time.perf_counter()
    userdeps.check(params.data, layout.root)  # an undeclared data file would go stale unseen
    manifest = prepare(params.data, layout)
    seconds = time.perf_counter() - started
    metrics = {
        "seconds": round(seconds, 3),
        "items": sum(sum(d["counts"].values()) for d in manifest["domains"].values()),
        "domains": {name: d["counts"] for name, d in manifest["domains"].items()},
        "leaked": manifest["decontamination"]["leaked"],
    }
    io.write_json(metrics, layout.metrics("prepare"))
    log.info("prepared %d items of %d domains in %.2f s", metrics["items"], len(manifest["domains"]), seconds)
    # Flat numbers for tracking (MLflow metrics are scalars); the JSON file keeps the nesting.
    flat = {k: v for k, v in metrics.items() if k != "domains"}
    flat.update(
        {f"items.{name}.{split}": n for name, counts in metrics["domains"].items() for split, n in counts.items()}
    )
    return StageResult(metrics=flat, artifacts=[layout.prepared / "manifest.json"])


if __name__ == "__main__":
    stage_main("prepare", run)
