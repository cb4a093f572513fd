"""AdaMerging on a tiny model: the coefficients move from their start and the entropy goes down."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.tiny import save_tiny, tiny_model, train_to_memorize

from posttrain.models.adamerging import adamerge

PAIRS = [(1, 2), (3, 4), (5, 1), (2, 2), (4, 3), (1, 1), (6, 2), (3, 3)]
WORDS = ["abc", "dog", "cat", "sun", "map", "pen", "cup", "box"]
ADD = [f"{a}+{b}=" for a, b in PAIRS]
REV = [f"rev:{w}=" for w in WORDS]


@pytest.fixture(scope="module")
def siblings(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A base model and two fine-tunes of it on different skills (sums, reversed words)."""
    root = tmp_path_factory.mktemp("ada")
    model, tok = tiny_model(seed=0)
    base = save_tiny(root / "base", model, tok)
    folders = []
    for name, prompts, answers in (
        ("add", ADD, [str(a + b) for a, b in PAIRS]),
        ("rev", REV, [w[::-1] for w in WORDS]),
    ):
        child, _ = tiny_model(seed=0)
        train_to_memorize(child, tok, prompts, answers, steps=40)
        folders.append(save_tiny(root / name, child, tok))
    return base, folders[0], folders[1]


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_coefficients_move_and_entropy_decreases(
    siblings: tuple[Path, Path, Path], tmp_path: Path, granularity: str
) -> None:
    base, add, rev = siblings
    stats = adamerge(
        [add, rev],
        base,
        tmp_path / "merged",
        ADD + REV,
        granularity=granularity,
        steps=15,
        lr=0.1,
        init=0.3,
        refresh=5,
        max_new_tokens=4,
    )
    rows = stats["coefficients"] if granularity == "layer" else {"all": stats["coefficients"]}
    # Every task vector's coefficient (per layer: at least one of its layers) left its start of 0.3.
    for k in range(2):
        assert max(abs(row[k] - 0.3) for row in rows.values()) > 0.01, stats["coefficients"]
    assert all(0.0 <= c <= 1.0 for row in rows.values() for c in row)  # projected onto [0, 1]
    assert stats["entropy_after"] < stats["entropy_before"]
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "config.json").is_file()
    if granularity == "layer":
        assert isinstance(stats["coefficients"], dict) and len(next(iter(stats["coefficients"].values()))) == 2
