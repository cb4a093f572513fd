"""Sibling fine-tunes: `variants.sft.<name>` become DVC stages `sft_variants@<name>` through `foreach`.

A real `dvc repro` of the tiny recipe up to two sft variants; then a change to one variant's own
params makes that variant, and nothing else upstream of merge, stale and rerun alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers.projects import make_small_project, run, stages_run
from helpers.tiny import tiny_raw

from posttrain.pipeline import dag


def test_a_variant_reruns_alone_when_only_its_own_params_change(tmp_path: Path) -> None:
    raw = tiny_raw()
    raw["variants"] = {"sft": {"arith": {"seed": 1}, "text": {"seed": 2, "trainer": {"learning_rate": 5.0e-4}}}}
    raw["mixtures"]["sft@arith"] = {**raw["mixtures"]["sft"], "weights": {"add": 0.5, "add3": 0.5}}
    raw["mixtures"]["sft@text"] = {**raw["mixtures"]["sft"], "weights": {"rev": 0.5, "sub": 0.5}}
    root = make_small_project(tmp_path, raw)

    done = run(["dvc", "repro", "sft_variants"], root)  # the foreach base name selects every variant
    ran = stages_run(done.stdout)
    assert {"sft_variants@arith", "sft_variants@text", "cpt"} <= set(ran) and "sft" not in ran
    for name, seed in (("arith", 1), ("text", 2)):
        lineage = json.loads((root / "artifacts/variants" / f"sft@{name}" / "lineage.json").read_text())
        assert lineage["stage"] == f"sft@{name}" and lineage["seed"] == seed
        assert [p["stage"] for p in lineage["parents"]] == ["cpt"]  # siblings: one parent
    lineage = json.loads((root / "artifacts/variants/sft@text/lineage.json").read_text())
    assert lineage["params"]["trainer"]["learning_rate"] == 5.0e-4  # the override reached the trainer

    raw["variants"]["sft"]["arith"]["seed"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _, statuses = dag.pipeline_status(root)
    stale = {name for name, status in statuses.items() if status.stale}
    assert "sft_variants@arith" in stale and "sft_variants@text" not in stale
    assert not stale & {"prepare", "mix", "pretrain", "cpt"}
    assert any("variants.sft.arith" in reason for reason in statuses["sft_variants@arith"].reasons)
    again = run(["dvc", "repro", "sft_variants"], root)
    assert stages_run(again.stdout) == ["sft_variants@arith"]
