"""Shared fixtures: a tiny valid params mapping and a throwaway copy of the project."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _tiny(raw: dict[str, Any]) -> dict[str, Any]:
    """The repo's recipe shrunk to a few hundred items, with MLflow tracking off."""
    raw = copy.deepcopy(raw)
    for domain in raw["data"]["domains"].values():
        if "n_items" in domain:
            domain["n_items"] = 300
    for mixture in raw["mixtures"].values():
        mixture["total"] = 200
    raw.setdefault("tracking", {})["enabled"] = False
    return raw


@pytest.fixture
def tiny_params() -> dict[str, Any]:
    """The raw params mapping (as read from params.yaml), small enough for fast tests."""
    return _tiny(yaml.safe_load((REPO / "params.yaml").read_text()))


@pytest.fixture
def project_copy(tmp_path: Path, tiny_params: dict[str, Any]) -> Path:
    """A copy of the project (code, dvc.yaml, DVC config) with tiny params, in a fresh git repo."""
    root = tmp_path / "project"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("posttrain", "stages"):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    # What `dvc init` would add besides the config.
    (root / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    shutil.copy2(REPO / ".dvcignore", root / ".dvcignore")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root
