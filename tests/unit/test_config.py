"""Config validation: every error names the key path, the bad value and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain.config import load_params, parse_params
from posttrain.errors import ParamsError

REPO = Path(__file__).resolve().parents[2]


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return str(info.value)


def test_repo_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert set(params.mixtures) == {"pretrain", "cpt", "sft", "dpo", "grpo"}


def test_tiny_params_are_valid(tiny_params: dict[str, Any]) -> None:
    assert parse_params(tiny_params).data.domains["add"].n_items == 300


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  seed: 0\n  domains: [unclosed\nmixtures: {}\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message and "malformed YAML" in message
    assert "line 4" in message  # the parser notices the unclosed list on the next key


def test_unknown_key(tiny_params: dict[str, Any]) -> None:
    tiny_params["data"]["split"]["vall_fraction"] = 0.1
    message = error_of(tiny_params)
    assert "data.split.vall_fraction: unknown key" in message and "0.1" in message


def test_wrong_type(tiny_params: dict[str, Any]) -> None:
    tiny_params["data"]["domains"]["add"]["digits"] = "two"
    message = error_of(tiny_params)
    assert "data.domains.add.digits" in message and "'two'" in message and "valid integer" in message


def test_negative_learning_rate(tiny_params: dict[str, Any]) -> None:
    tiny_params["sft"]["trainer"]["learning_rate"] = -0.001
    message = error_of(tiny_params)
    assert "sft.trainer.learning_rate" in message and "-0.001" in message and "greater than 0" in message


def test_negative_weight(tiny_params: dict[str, Any]) -> None:
    tiny_params["mixtures"]["sft"]["weights"]["add"] = -0.3
    message = error_of(tiny_params)
    assert "mixtures.sft.weights.add" in message and "-0.3" in message and "greater than or equal to 0" in message


def test_all_zero_weights(tiny_params: dict[str, Any]) -> None:
    tiny_params["mixtures"]["dpo"]["weights"] = {"add": 0, "add3": 0.0}
    message = error_of(tiny_params)
    assert (
        "mixtures.dpo.weights" in message and "all weights are zero" in message and "at least one weight > 0" in message
    )


def test_split_fraction_over_one(tiny_params: dict[str, Any]) -> None:
    tiny_params["data"]["split"]["test_fraction"] = 1.5
    message = error_of(tiny_params)
    assert "data.split.test_fraction" in message and "1.5" in message and "less than 1" in message


def test_split_fractions_leave_no_training_data(tiny_params: dict[str, Any]) -> None:
    tiny_params["data"]["split"].update(val_fraction=0.5, test_fraction=0.6)
    message = error_of(tiny_params)
    assert "data.split" in message and "1.1" in message and "expected a sum below 1" in message


def test_unknown_domain_in_mixture(tiny_params: dict[str, Any]) -> None:
    tiny_params["mixtures"]["sft"]["weights"]["mul"] = 0.3
    message = error_of(tiny_params)
    assert (
        "mixtures.sft.weights.mul" in message
        and "'mul'" in message
        and "a domain in ['add', 'add3', 'rev', 'sub']" in message
    )


def test_unknown_replay_source(tiny_params: dict[str, Any]) -> None:
    tiny_params["mixtures"]["cpt"]["replay"]["from_stage"] = "pretrian"
    message = error_of(tiny_params)
    assert "mixtures.cpt.replay.from_stage" in message and "'pretrian'" in message and "one of" in message


def test_unknown_verifier(tiny_params: dict[str, Any]) -> None:
    tiny_params["data"]["domains"]["add"]["verifier"] = "fuzzy"
    message = error_of(tiny_params)
    assert "data.domains.add.verifier" in message and "'fuzzy'" in message and "expected one of ['exact'" in message


def test_unknown_column_field(tiny_params: dict[str, Any]) -> None:
    tiny_params["data"]["domains"]["qa"] = {"kind": "file", "path": "qa.jsonl", "columns": {"question": "q"}}
    message = error_of(tiny_params)
    assert "data.domains.qa.columns" in message and "['question']" in message and "expected keys among" in message


def test_reverse_lengths_out_of_order(tiny_params: dict[str, Any]) -> None:
    tiny_params["data"]["domains"]["rev"].update(min_length=7, max_length=3)
    message = error_of(tiny_params)
    assert "data.domains.rev" in message and "min_length (7) is greater than max_length (3)" in message


def test_config_import_stays_light() -> None:
    code = (
        "import sys, posttrain.config, posttrain.data.domains\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'mlflow', 'prefect', 'datasets', 'pyarrow', 'pandas')"
        " if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_yaml_dump_roundtrip_is_valid(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    # The e2e tests rewrite params.yaml with yaml.safe_dump; it must stay loadable.
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    assert load_params(path).mixtures["grpo"].total == 200
