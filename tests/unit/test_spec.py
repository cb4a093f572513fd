"""The stage spec (posttrain.spec): the recipe's chain, dvc.yaml written from it, and each stage's identity."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from helpers.tiny import REPO, tiny_params, tiny_raw

from posttrain import spec
from posttrain.config import parse_params
from posttrain.errors import ParamsError
from posttrain.tracking.runs import stage_params

VARIANTS = {
    "variants": {"sft": {"arith": {"trainer": {"max_steps": 120}, "seed": 7}}},
    "mixtures": {"sft@arith": {"format": "prompt_completion", "weights": {"add": 1.0}}},
}


def _stages(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def test_the_committed_dvc_yaml_is_the_default_recipe_rendered() -> None:
    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert spec.drift(params, REPO) == []
    assert (REPO / "dvc.yaml").read_text() == spec.render_dvc_yaml(
        spec.recipe_specs(params, REPO), spec.read_dvc_yaml(REPO)
    )


def test_the_default_chain_runs_every_stage_each_on_the_one_before() -> None:
    params = tiny_params(**VARIANTS)
    assert params.chain() == ["pretrain", "cpt", "sft", "sft@arith", "dpo", "grpo", "merge"]
    specs = spec.recipe_specs(params, REPO)
    assert {name: s.parents for name, s in specs.items() if s.trained} == {
        "pretrain": (), "cpt": ("pretrain",), "sft": ("cpt",), "sft@arith": ("cpt",), "dpo": ("sft",), "grpo": ("dpo",),
    }  # fmt: skip
    assert specs["sft@arith"].dvc_name == "sft_variants@arith" and specs["sft@arith"].kind == "sft"


def test_a_recipe_skips_a_stage_by_naming_another_parent(tmp_path: Path) -> None:
    """`sft.parent: pretrain` skips cpt: no cpt stage in dvc.yaml, nothing runs or is written for it."""
    raw = tiny_raw(sft={"parent": "pretrain"}, grpo={"parent": "sft"})
    raw["evaluate"]["models"] = ["pretrain", "sft", "grpo", "merge"]
    raw["merge"] = {**raw["merge"], "models": ["sft", "grpo"]}
    del raw["mixtures"]["cpt"], raw["mixtures"]["dpo"]  # a skipped stage needs no mixture
    params = parse_params(raw)
    assert params.chain() == ["pretrain", "sft", "grpo", "merge"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"mine": {"cmd": "echo hi"}}}))
    changes = spec.sync_dvc_yaml(params, tmp_path)
    stages = _stages(tmp_path)
    assert "cpt" not in stages and "dpo" not in stages and "sft_variants" not in stages
    assert "artifacts/models/pretrain" in stages["sft"]["deps"] and "artifacts/models/cpt" not in stages["sft"]["deps"]
    assert "artifacts/models/sft" in stages["grpo"]["deps"]
    assert stages["mine"] == {"cmd": "echo hi"}  # a user's own stage is kept
    assert "stage sft added" in changes and spec.sync_dvc_yaml(params, tmp_path) == []  # idempotent
    with pytest.raises(ParamsError, match="'cpt' is not in this recipe's chain"):
        spec.stage_spec(params, tmp_path, "cpt")


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"dpo": {"parent": "grpo"}}, "dpo.parent: got 'grpo', expected one of ['pretrain', 'cpt', 'sft']"),
        ({"pretrain": {"parent": "cpt"}}, "pretrain.parent: got 'cpt', expected null (pretrain starts the chain)"),
        ({"sft": {"parent": "merge"}}, "sft.parent: got 'merge'"),
    ],
)
def test_a_parent_must_be_an_earlier_training_stage(sections: dict, key: str) -> None:
    with pytest.raises(ParamsError) as info:
        tiny_params(**sections)
    assert key in str(info.value)


def test_a_variant_cannot_move_its_parent() -> None:
    raw = tiny_raw(**VARIANTS)
    raw["variants"]["sft"]["arith"]["parent"] = "pretrain"
    with pytest.raises(ParamsError, match=r"variants.sft.arith.parent: a variant trains on its stage's parent"):
        parse_params(raw)


def test_another_recipes_domains_get_exactly_their_pretrain_deps(tmp_path: Path) -> None:
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = parse_params(yaml.safe_load((REPO / "configs" / "smollm2-135m.yaml").read_text()))
    drift = spec.drift(params, tmp_path)
    assert drift and all("sync-deps" in line for line in drift)
    pretrain = spec.stage_spec(params, tmp_path, "pretrain")
    assert any("artifacts/data/prepared/prefs" in line for line in spec.missing_declarations(pretrain, tmp_path))
    spec.sync_dvc_yaml(params, tmp_path)
    prepared = [d for d in _stages(tmp_path)["pretrain"]["deps"] if d.startswith("artifacts/data/prepared/")]
    assert sorted(prepared) == sorted(f"artifacts/data/prepared/{d}" for d in params.pretrain_domains())
    assert "configs/data/general_chat.jsonl" in _stages(tmp_path)["prepare"]["deps"]  # the recipe's data files
    assert spec.drift(params, tmp_path) == [] and spec.missing_declarations(pretrain, tmp_path) == []


def test_a_stage_refuses_to_run_when_dvc_yaml_lacks_what_it_reads(tmp_path: Path) -> None:
    params = tiny_params()
    spec.sync_dvc_yaml(params, tmp_path)
    stages = _stages(tmp_path)
    stages["sft"]["deps"].remove("artifacts/models/cpt")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(ParamsError, match=r"stage sft does not declare dep artifacts/models/cpt.*posttrain sync-deps"):
        spec.check_declared(spec.stage_spec(params, tmp_path, "sft"), tmp_path)
    spec.check_declared(spec.stage_spec(params, tmp_path, "dpo"), tmp_path)  # the others are fine


def test_a_variant_records_the_settings_it_ran_with() -> None:
    """MLflow logged sft@arith as sft.trainer.max_steps=1200 (sft's) with sft's params hash."""
    params = tiny_params(**VARIANTS)
    variant, base = stage_params(params, REPO, "sft@arith"), stage_params(params, REPO, "sft")
    assert variant["sft.trainer.max_steps"] == "120" and base["sft.trainer.max_steps"] != "120"
    assert variant["seed"] == "7" and "mixtures.sft@arith.weights.add" in variant
    assert not any(key.startswith("mixtures.sft.") for key in variant)
    assert variant != base


def test_stage_names_are_parsed_only_in_the_spec_module() -> None:
    """One place knows that '@' separates a variant and reads dvc.yaml: the spec module."""
    offenders = []
    for path in (
        sorted((REPO / "posttrain").rglob("*.py"))
        + sorted((REPO / "stages").glob("*.py"))
        + sorted((REPO / "flows").glob("*.py"))
    ):
        if path.name == "spec.py":
            continue
        text = path.read_text()
        if re.search(r"""(split|partition)\(["']@["']\)""", text) or re.search(
            r"""["']dvc\.yaml["']\)\.(read_text|open)""", text
        ):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
