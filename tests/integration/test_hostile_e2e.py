"""Hostile inputs, cases 1-3 of docs/reliability.md, end to end through real DVC (and MLflow for case 2):

1. an edited user data file makes `prepare` stale and `dvc repro` reruns it;
2. after DVC's run cache restores an older `merge` output, promotion follows the workspace model;
3. params.yaml edited while a stage runs: the stage fails naming the key, dvc.lock is not written.

Cases 2 and 3 run the real stage entry (posttrain.pipeline.entry.stage_main) from small stage scripts, so
the DVC and MLflow behaviour is real while no model is trained.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.tiny import REPO

from posttrain.config import parse_params
from posttrain.pipeline import dag
from posttrain.spec import stage_spec


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(dag.dvc_command(*args), cwd=root, capture_output=True, text=True, env=env)


def posttrain_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "posttrain.pipeline.cli", *args], cwd=root, capture_output=True, text=True, env=env
    )


def qa_lines(answer_digit: str = "1", n: int = 200) -> str:
    return "".join(json.dumps({"prompt": f"q{i}?", "answer": f"{answer_digit}{i}"}) + "\n" for i in range(n))


# --------------------------------------------------------------------------- case 1


def test_edited_user_file_makes_prepare_stale_and_repro_reruns_it(project_copy: Path) -> None:
    root = project_copy
    (root / "data").mkdir()
    (root / "data" / "qa.jsonl").write_text(qa_lines("1"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["domains"]["qa"] = {"kind": "file", "path": "data/qa.jsonl"}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # Not a dependency yet: validate says so, and prepare refuses instead of going stale unseen.
    checked = posttrain_cli(root, "validate")
    assert checked.returncode == 1 and "stage prepare: deps gain data/qa.jsonl" in checked.stderr
    shown = posttrain_cli(root, "status")
    assert "warning: " in shown.stdout and "stage prepare: deps gain data/qa.jsonl" in shown.stdout
    refused = dvc(root, "repro", "prepare")
    assert refused.returncode != 0
    assert "does not declare dep data/qa.jsonl" in refused.stderr and "posttrain sync-deps" in refused.stderr

    synced = posttrain_cli(root, "sync-deps")
    assert synced.returncode == 0, synced.stderr
    assert "data/qa.jsonl" in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["prepare"]["deps"]
    assert "# Generated from params.yaml" in (root / "dvc.yaml").read_text()
    first = dvc(root, "repro", "prepare")
    assert first.returncode == 0, first.stderr
    manifest = json.loads((root / "artifacts/data/prepared/manifest.json").read_text())
    assert dvc(root, "status", "prepare").stdout.strip().endswith("up to date.")

    # The user edits the data: DVC sees it by content, and repro reruns prepare with the new data.
    (root / "data" / "qa.jsonl").write_text(qa_lines("9"))
    status = dvc(root, "status", "prepare")
    assert "changed deps" in status.stdout and "data/qa.jsonl" in status.stdout
    again = dvc(root, "repro", "prepare")
    assert again.returncode == 0, again.stderr
    assert "Running stage 'prepare'" in again.stdout
    after = json.loads((root / "artifacts/data/prepared/manifest.json").read_text())
    assert after["domains"]["qa"]["content_hashes"] != manifest["domains"]["qa"]["content_hashes"]
    assert after["domains"]["add"]["content_hashes"] == manifest["domains"]["add"]["content_hashes"]


# --------------------------------------------------------------------------- case 2

MERGE_SCRIPT = """
from posttrain.pipeline.entry import stage_main
from posttrain.stage import StageResult
from helpers.tracking import make_model, write_stage_metrics


def run(params, layout):
    # A real (tiny) model whose weights depend on merge.density, as a real merge's would.
    folder = make_model(layout, "merge", seed=int(params.merge.density * 100))
    write_stage_metrics(layout, "merge")
    return StageResult(metrics={"density": params.merge.density}, model_dir=folder)


stage_main("merge", run)
"""


def _init_dvc(root: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    done = dvc(root, "init", "-q")
    assert done.returncode == 0, done.stderr


def _set_density(root: Path, value: float) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["merge"]["density"] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.timeout(600)
def test_promotion_follows_the_workspace_model_after_a_run_cache_restore(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from posttrain.config import load_params
    from posttrain.tracking import registry

    root = tmp_path / "proj"
    root.mkdir()
    _init_dvc(root)
    raw: dict[str, Any] = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tracking"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    raw["promotion"]["candidate"] = {"stage": "merge"}  # the workspace's merge model, whatever the recipe picks
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    raw["merge"] = {**raw["merge"], "models": ["sft"], "method": "linear", "weights": None}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "artifacts/data/prepared").mkdir(parents=True)
    (root / "artifacts/data/prepared/manifest.json").write_text("{}")
    (root / "artifacts/models/sft").mkdir(parents=True)
    (root / "artifacts/models/sft/README").write_text("the merge's declared input (the toy merge reads nothing)\n")
    (root / "toy_merge.py").write_text(MERGE_SCRIPT)
    # The merge stage as the recipe declares it (its data deps and params), running a toy command.
    stage = {"cmd": f"{sys.executable} toy_merge.py", "deps": ["artifacts/data/prepared", "artifacts/models/sft"],
             "params": ["merge"], "outs": ["artifacts/models/merge"]}  # fmt: skip
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"merge": stage}}))
    name = "posttrain"

    def candidate() -> str:
        """The version holding the workspace's merge model."""
        uri = raw["tracking"]["tracking_uri"]
        content = json.loads((root / "artifacts/models/merge/lineage.json").read_text())["content_hash"]
        return str(registry.find_version(MlflowClient(uri, uri), name, "merge", content).version)

    _set_density(root, 0.6)
    done = dvc(root, "repro")
    assert done.returncode == 0, done.stderr + done.stdout
    v1 = candidate()
    _set_density(root, 0.5)
    assert dvc(root, "repro").returncode == 0
    v2 = candidate()
    _set_density(root, 0.6)
    restored = dvc(root, "repro")
    assert restored.returncode == 0 and "skipping run" in restored.stdout  # DVC's run cache, no stage run
    assert v1 != v2 and candidate() == v1  # the restored model is the first run's version

    params = load_params(root / "params.yaml")
    result = registry.promote(params, root)  # refused (no evaluation), but judged on the workspace's model
    assert result.version == v1 and "has no evaluation" in result.reason
    uri = raw["tracking"]["tracking_uri"]
    assert str(MlflowClient(uri, uri).get_registered_model(name).aliases["candidate"]) == v1

    # A workspace model that was never registered: refused, naming both.
    lineage_path = root / "artifacts/models/merge/lineage.json"
    lineage = json.loads(lineage_path.read_text())
    lineage["content_hash"] = "f" * 64
    lineage_path.write_text(json.dumps(lineage))
    with pytest.raises(registry.PromotionError, match=r"\('merge', content ffffffffffff\) is not a version of"):
        registry.promote(params, root)


# --------------------------------------------------------------------------- case 3

PRETRAIN_SCRIPT = """
from pathlib import Path

import yaml

from posttrain.pipeline.entry import stage_main
from posttrain.stage import StageResult


def run(params, layout):
    editor = layout.root / "edit-once"
    if editor.exists():  # another user edits params.yaml while this stage runs
        editor.unlink()
        path = layout.root / "params.yaml"
        raw = yaml.safe_load(path.read_text())
        raw["seed"] = 2222
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    (layout.root / "out.txt").write_text(f"trained with seed {params.seed}\\n")
    return StageResult()


stage_main("pretrain", run)
"""


def test_params_edited_during_a_stage_fail_it_and_leave_dvc_lock_unwritten(
    tmp_path: Path, tiny_params: dict[str, Any]
) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    _init_dvc(root)
    tiny_params["seed"] = 1111
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    (root / "toy_pretrain.py").write_text(textwrap.dedent(PRETRAIN_SCRIPT))
    # The stage as the recipe declares it (data deps, params keys), running a toy command.
    spec = stage_spec(parse_params(tiny_params), root, "pretrain")
    for dep in spec.data_deps:
        (root / dep).mkdir(parents=True, exist_ok=True)
        (root / dep / "README").write_text("toy input\n")
    stage = {"cmd": f"{sys.executable} toy_pretrain.py", "deps": list(spec.data_deps), "params": list(spec.params_keys),
             "outs": ["out.txt"]}  # fmt: skip
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": stage}}))
    (root / "edit-once").touch()

    failed = dvc(root, "repro")
    assert failed.returncode != 0
    assert "seed: 1111 -> 2222" in failed.stderr and "changed while the stage ran" in failed.stderr
    lock = root / "dvc.lock"
    assert not lock.exists() or "pretrain" not in (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    assert dvc(root, "status").stdout.count("pretrain") >= 1  # still stale

    rerun = dvc(root, "repro")
    assert rerun.returncode == 0, rerun.stderr
    assert yaml.safe_load(lock.read_text())["stages"]["pretrain"]["params"]["params.yaml"]["seed"] == 2222
    assert (root / "out.txt").read_text() == "trained with seed 2222\n"
