import json
from pathlib import Path

import pytest

from posttrain.errors import StageError
from posttrain.io import atomic_output_dir, redact, write_json_atomic
from posttrain.lineage import file_hashes, parent_entry, verify_model_folder, write_lineage


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (path / "config.json").write_text('{"hidden_size": 8}')
    return path


def test_lineage_records_hashes_and_verifies(tmp_path):
    model = _model_folder(tmp_path / "m")
    record = write_lineage(model, stage="sft", root=tmp_path, parents=[], params={"lr": 1}, params_hash="abc", seed=3)
    assert set(record["files"]) == {"model.safetensors", "config.json"}
    assert record["seed"] == 3 and record["params_hash"] == "abc"
    assert "torch" in record["versions"] or "python" in record["versions"]
    assert verify_model_folder(model)["content_hash"] == record["content_hash"]


def test_flipped_byte_is_detected_with_both_hashes(tmp_path):
    model = _model_folder(tmp_path / "m")
    write_lineage(model, stage="sft", root=tmp_path, parents=[], params={}, params_hash="x", seed=0)
    data = bytearray((model / "model.safetensors").read_bytes())
    data[100] ^= 0x01
    (model / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(StageError, match=r"model\.safetensors.*recorded sha256 [0-9a-f]{64}, found [0-9a-f]{64}"):
        verify_model_folder(model)


def test_missing_and_added_files_are_detected(tmp_path):
    model = _model_folder(tmp_path / "m")
    write_lineage(model, stage="sft", root=tmp_path, parents=[], params={}, params_hash="x", seed=0)
    (model / "extra.bin").write_bytes(b"1")
    with pytest.raises(StageError, match="extra.bin"):
        verify_model_folder(model)


def test_parent_entry_uses_recorded_hash(tmp_path):
    model = _model_folder(tmp_path / "artifacts" / "models" / "cpt")
    record = write_lineage(
        model, stage="cpt", root=tmp_path, parents=[], params={}, params_hash="x", seed=0,
        extra={"chat_template_fingerprint": "ab" * 32},
    )  # fmt: skip
    entry = parent_entry(model, tmp_path, weight=0.5)
    assert entry == {
        "stage": "cpt",
        "path": "artifacts/models/cpt",
        "content_hash": record["content_hash"],
        "weight": 0.5,
        "chat_template_fingerprint": "ab" * 32,  # what every later stage checks its template against
    }


def test_atomic_output_dir_keeps_previous_output_on_failure(tmp_path):
    final = tmp_path / "out"
    with atomic_output_dir(final) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (final / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_output_dir_replaces_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_output_dir(final) as tmp:
        (tmp / "a.txt").write_text("first")
    with atomic_output_dir(final) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_redact_hides_passwords_and_tokens():
    value = {
        "tracking_uri": "https://alice:s3cret@mlflow.example.org/",
        "hf_token": "hf_abc",
        "nested": ["postgresql://u:pw@db/x", 3],
        "learning_rate": 0.1,
    }
    clean = redact(value)
    text = json.dumps(clean)
    assert "s3cret" not in text and "hf_abc" not in text and ":pw@" not in text
    assert clean["learning_rate"] == 0.1 and "alice:***@" in clean["tracking_uri"]


def test_write_json_atomic_round_trip(tmp_path):
    path = tmp_path / "metrics" / "x.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert file_hashes(tmp_path) and not list(path.parent.glob(".*tmp*"))


def test_environment_is_added_to_a_metrics_file(tmp_path):
    from posttrain.lineage import add_environment, cpu_model

    path = tmp_path / "stage.json"
    add_environment(path)  # a stage that wrote no metrics: nothing to add to
    assert not path.exists()
    path.write_text(json.dumps({"steps": 3}))
    add_environment(path)
    data = json.loads(path.read_text())
    assert data["steps"] == 3
    assert data["environment"]["cpu"] == cpu_model() != ""
    assert {"python", "torch", "transformers", "trl"} <= set(data["environment"]["libraries"])
