"""pretrain's prepared-domain deps in dvc.yaml follow the recipe's tokenizer domains (any recipe, not
only the default one): `posttrain sync-deps` / `posttrain run` rewrite them, `validate` reports drift."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from posttrain.config import parse_params
from posttrain.data import userdeps

REPO = Path(__file__).resolve().parents[2]


def _pretrain_prepared(root: Path) -> list[str]:
    deps = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["pretrain"]["deps"]
    return [d for d in deps if d.startswith("artifacts/data/prepared/")]


def test_a_recipe_with_other_domains_gets_exactly_its_own_pretrain_deps(tmp_path: Path) -> None:
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = parse_params(yaml.safe_load((REPO / "configs" / "smollm2-135m.yaml").read_text()))
    domains = params.pretrain_domains()
    assert set(domains) == {"add", "prefs", "chat"}  # tokenizer domains null: every domain

    problems = userdeps.pretrain_problems(domains, tmp_path)
    assert any("artifacts/data/prepared/prefs" in p and "sync-deps" in p for p in problems)
    assert any("artifacts/data/prepared/rev" in p for p in problems)  # the default recipe's, not this one's

    added, removed = userdeps.sync_pretrain(domains, tmp_path)
    assert sorted(added) == ["artifacts/data/prepared/chat", "artifacts/data/prepared/prefs"]
    assert sorted(removed) == [
        "artifacts/data/prepared/add3",
        "artifacts/data/prepared/rev",
        "artifacts/data/prepared/sub",
    ]
    assert sorted(_pretrain_prepared(tmp_path)) == sorted(f"artifacts/data/prepared/{d}" for d in domains)
    assert "# The one definition" in (tmp_path / "dvc.yaml").read_text()  # comments kept
    assert userdeps.pretrain_problems(domains, tmp_path) == []
    assert userdeps.sync_pretrain(domains, tmp_path) == ([], [])  # idempotent


def test_the_default_recipe_is_in_sync_with_the_committed_dvc_yaml() -> None:
    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert userdeps.pretrain_problems(params.pretrain_domains(), REPO) == []
