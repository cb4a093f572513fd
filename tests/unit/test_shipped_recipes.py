"""Every recipe the project ships validates against the schema and its cross-references (a check
added for one recipe must not silently refuse another, e.g. conversational SFT in the SmolLM2 one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from posttrain.config import parse_params

REPO = Path(__file__).resolve().parents[2]
RECIPES = [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path: Path) -> None:
    parse_params(yaml.safe_load(path.read_text()), source=str(path))
