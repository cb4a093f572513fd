"""New data reruns only what it feeds: the continual flow's incoming-data step adds a CPT domain,
and `dvc repro cpt` reruns prepare, mix and cpt but not pretrain (real DVC, tiny recipe)."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers.projects import make_project_copy, run, stages_run

pytestmark = pytest.mark.slow


def test_incoming_batch_reruns_cpt_but_not_pretrain(tmp_path):
    from flows.continual import ingest, new_files
    from posttrain.config import load_params

    root = make_project_copy(tmp_path / "project")
    first = run(["dvc", "repro", "cpt"], root)
    assert stages_run(first.stdout) == ["prepare", "mix", "pretrain", "cpt"], first.stdout

    cfg = load_params(root / "params.yaml").orchestration.continual
    incoming = root / cfg.incoming_dir
    incoming.mkdir(parents=True)
    (incoming / "batch1.jsonl").write_text("".join(f'{{"prompt": "{a}*2=", "answer": "{2 * a}"}}\n' for a in range(40)))
    ingest(root, new_files(root, cfg), cfg)
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert cfg.domain in params["data"]["domains"] and cfg.domain in params["mixtures"]["cpt"]["weights"]

    # DVC's own view: prepare's params changed; pretrain's deps and params did not.
    changed = json.loads(run(["dvc", "status", "--json"], root).stdout)
    assert "prepare" in changed and "pretrain" not in changed, changed
    second = run(["dvc", "repro", "cpt"], root)
    ran = stages_run(second.stdout)
    assert ran == ["prepare", "mix", "cpt"], second.stdout
    assert "Stage 'pretrain' didn't change, skipping" in second.stdout


def test_pretrain_refuses_a_tokenizer_domain_missing_from_its_dvc_deps(tmp_path):
    from helpers.tiny import tiny_params

    from posttrain.errors import ParamsError
    from posttrain.spec import check_declared, stage_spec

    params = tiny_params(model={"tokenizer": {"domains": ["add", "sub"]}})
    spec = stage_spec(params, tmp_path, "pretrain")
    stage = {"cmd": spec.command, "deps": [*spec.code_deps, "artifacts/data/prepared/add", "artifacts/data/mixtures/pretrain"],
             "params": list(spec.params_keys)}  # fmt: skip
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": stage}}))
    with pytest.raises(ParamsError, match=r"does not declare dep artifacts/data/prepared/sub.*posttrain sync-deps"):
        check_declared(spec, tmp_path)
    stage["deps"].append("artifacts/data/prepared")  # the whole folder covers every domain
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": stage}}))
    check_declared(spec, tmp_path)
