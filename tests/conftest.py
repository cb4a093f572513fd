"""Markers by folder, and the shared fixtures built from `helpers.tiny` (configs/tiny.yaml).

- `tests/unit/`: no trainer, no DVC/Prefect/MLflow process; fast.
- `tests/integration/`: real trainers, DVC, Prefect or MLflow; marked `integration`, so
  `pytest -m "not integration"` trains nothing. `python -m pytest` runs both.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.projects import make_small_project
from helpers.tiny import REPO, tiny_raw

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if (TESTS / "integration") in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def tiny_params() -> dict[str, Any]:
    """The raw tiny recipe (configs/tiny.yaml, tracking off), small enough for fast tests."""
    return tiny_raw()


@pytest.fixture
def project_copy(tmp_path: Path, tiny_params: dict[str, Any]) -> Path:
    """A copy of the project (code, dvc.yaml, DVC config) with tiny params, in a fresh git repo."""
    return make_small_project(tmp_path, tiny_params)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct folder, fetched once by the project's own script where it is missing."""
    model = REPO / "models" / "smollm2-135m-instruct"
    if not (model / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_smollm2.py")], check=True, timeout=900)
    return model
