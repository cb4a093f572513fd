"""Stage `mix`: build the training mixture of every training stage from the prepared train splits.

    artifacts/data/mixtures/<stage>/train.parquet   columns by the mixture's format (docs/design.md)
    artifacts/data/mixtures/<stage>/manifest.json   weights, proportions, counts, replay, ids, hash, seed
    artifacts/metrics/mix.json                      per-stage totals and seconds

Reads `mixtures` from params.yaml and artifacts/data/prepared (checked against prepare's manifest).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from posttrain import io
from posttrain.config import Params
from posttrain.data import domains, mixing
from posttrain.data.domains import Record
from posttrain.errors import DataError
from posttrain.layout import Layout
from posttrain.pipeline.entry import stage_main
from posttrain.stage import StageResult

log = logging.getLogger("posttrain.mix")


def load_train_splits(layout: Layout, needed: set[str]) -> tuple[dict[str, list[Record]], str]:
    """Train records of the `needed` domains, each verified against prepare's manifest hash."""
    manifest_path = layout.prepared / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: not found; run the prepare stage first (dvc repro prepare)")
    manifest = io.read_json(manifest_path)
    train: dict[str, list[Record]] = {}
    for domain in sorted(needed):
        entry = manifest["domains"].get(domain)
        if entry is None:
            raise DataError(
                f"{manifest_path}: no prepared domain {domain!r} (prepared: {sorted(manifest['domains'])}); "
                "rerun prepare after adding it to data.domains"
            )
        path = layout.prepared_split(domain, "train")
        expected = entry["content_hashes"]["train"]
        actual = io.sha256_file(path) if path.is_file() else "missing"
        if actual != expected:
            raise DataError(
                f"{path}: content hash {actual} differs from prepare's manifest ({expected}); rerun prepare"
            )
        train[domain] = io.read_parquet(path, domains.RECORD_COLUMNS)
    return train, io.sha256_file(manifest_path)


def run(params: Params, layout: Layout) -> StageResult:
    started = time.perf_counter()
    mixtures = params.mixtures
    order = mixing.stage_order(mixtures)
    needed = {d for m in mixtures.values() for d, w in m.weights.items() if w > 0}
    train, prepared_hash = load_train_splits(layout, needed)

    built: dict[str, mixing.Mixture] = {}
    metrics: dict[str, Any] = {"stages": {}}
    out_root = layout.mixture(order[0]).parent
    with io.atomic_output_dir(out_root) as tmp:
        for stage in order:
            stage_started = time.perf_counter()
            mixture = mixing.build_mixture(stage, mixtures[stage], train, built)
            built[stage] = mixture
            content_hash = io.write_parquet(mixture.rows, tmp / stage / "train.parquet", mixture.columns)
            manifest = {**mixture.manifest, "content_hash": content_hash, "prepared_manifest_hash": prepared_hash}
            io.write_json(manifest, tmp / stage / "manifest.json")
            replay = manifest["replay"]["items"] if manifest["replay"] else 0
            metrics["stages"][stage] = {
                "total": manifest["total"],
                "replay": replay,
                "with_replacement": sum(manifest["with_replacement"].values()),
            }
            log.info(
                "mixture %s: %d rows (%s)%s, format %s, in %.2f s",
                stage,
                manifest["total"],
                ", ".join(f"{d} {n}" for d, n in manifest["counts"].items()),
                f" + {replay} replayed from {manifest['replay']['from_stage']}" if replay else "",
                manifest["format"],
                time.perf_counter() - stage_started,
            )
            for domain, repeats in manifest["with_replacement"].items():
                log.warning(
                    "mixture %s: domain %s has %d train items for %d draws; %d drawn with replacement",
                    stage,
                    domain,
                    len(train[domain]),
                    manifest["counts"][domain],
                    repeats,
                )
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    io.write_json(metrics, layout.metrics("mix"))
    flat = {"seconds": metrics["seconds"]}
    flat.update({f"{stage}.{k}": v for stage, m in metrics["stages"].items() for k, v in m.items()})
    return StageResult(metrics=flat, artifacts=[layout.mixture(s) / "manifest.json" for s in order])


if __name__ == "__main__":
    stage_main("mix", run)
