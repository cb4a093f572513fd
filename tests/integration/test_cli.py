"""The `posttrain` command line: help, validation, status, plain DVC runs, and a failing run through Prefect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures.toy_dvc import make_toy_project, toy_env
from typer.testing import CliRunner

from posttrain.pipeline.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["run", "status", "validate", "promote", "rollback", "registry", "deploy", "continual", "services"]
HEAVY = ("torch", "transformers", "trl", "mlflow", "prefect")

runner = CliRunner()


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATH", toy_env()["PATH"])
    return make_toy_project(tmp_path / "toy")


def test_help_lists_every_command_and_each_has_help() -> None:
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for command in COMMANDS:
        assert command in top.output
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output and len(result.output.splitlines()) > 5


@pytest.mark.parametrize("args", [["--help"], ["validate"], ["status"]])
def test_fast_commands_import_no_heavy_library(args: list[str]) -> None:
    probe = (
        "import sys\n"
        "from posttrain.pipeline.cli import app\n"
        "try:\n"
        f"    app({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr


def test_validate_good_and_bad_params(tmp_path: Path) -> None:
    good = runner.invoke(app, ["validate", "--root", str(ROOT)])
    assert good.exit_code == 0 and good.output.startswith("OK: ")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sft"]["trainer"]["learning_rate"] = -1
    raw["orchestration"]["max_parallel"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "sft.trainer.learning_rate" in result.output and "orchestration.max_parallel" in result.output
    missing = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_status_says_what_is_stale_and_shows_metrics(toy: Path) -> None:
    before = runner.invoke(app, ["status", "--root", str(toy)])
    assert before.exit_code == 0
    assert "source           stale" in before.output and "upstream stage(s) source will rerun" in before.output
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=toy, check=True)
    after = runner.invoke(app, ["status", "--root", str(toy)])
    assert "stale" not in after.output and "join             up to date" in after.output
    assert "join           lines=4" in after.output  # artifacts/metrics/join.json


def test_run_without_prefect_is_plain_dvc_repro_and_overrides_apply(toy: Path) -> None:
    result = runner.invoke(app, ["run", "--no-prefect", "--set", "seed=3", "--root", str(toy)])
    assert result.exit_code == 0, result.output
    assert (toy / "out" / "source.txt").read_text().startswith("seed=3\n")
    assert yaml.safe_load((toy / "dvc.lock").read_text())["stages"]["source"]["params"]["params.yaml"]["seed"] == 3


def test_bad_override_is_refused_before_anything_runs(toy: Path) -> None:
    params = (toy / "params.yaml").read_text()
    result = runner.invoke(app, ["run", "--set", "orchestration.max_parallel=zero", "--root", str(toy)])
    assert result.exit_code == 1 and "orchestration.max_parallel" in result.output
    assert (toy / "params.yaml").read_text() == params and not (toy / "out").exists()


def test_promote_force_needs_a_reason() -> None:
    result = runner.invoke(app, ["promote", "--force", "--root", str(ROOT)])
    assert result.exit_code == 1 and "--reason" in result.output


@pytest.mark.e2e
def test_failing_run_through_prefect_ends_with_the_stages_own_error(toy: Path, tmp_path: Path) -> None:
    (toy / "toy" / "left.py").write_text(
        "import sys\nprint('error: stage left: bad row 7 in out/source.txt', file=sys.stderr)\nsys.exit(1)\n"
    )
    home = tmp_path / "prefect"
    env = toy_env() | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
    }
    env.pop("PREFECT_API_URL", None)  # ephemeral server of its own
    done = subprocess.run(
        [sys.executable, "-m", "posttrain.pipeline.cli", "run", "--root", str(toy)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    final = done.stderr[done.stderr.rindex("\nerror: ") + 1 :]
    assert final.startswith("error: stage left: bad row 7 in out/source.txt\n"), final
    assert not (toy / "out" / "join.txt").exists() and (toy / "out" / "right.txt").exists()
    assert os.path.exists(toy / "dvc.lock")


def test_no_change_run_answers_from_dvc_status_without_starting_prefect(toy: Path, tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=toy, check=True, env=toy_env())
    home = tmp_path / "prefect"
    env = toy_env() | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "posttrain.pipeline.cli", "run", "--root", str(toy)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nothing to run, Prefect not started" in done.stdout
    assert not (home / "prefect.db").exists()  # no Prefect server or database was started
    # Once a param changes, the shortcut no longer applies: the stale stages go through the flow.
    from posttrain.pipeline.cli import _nothing_to_run

    assert _nothing_to_run(toy, None, False)
    (toy / "params.yaml").write_text((toy / "params.yaml").read_text().replace("seed: 1", "seed: 2"))
    assert not _nothing_to_run(toy, None, False)


def test_whole_run_ends_with_the_gate_and_exit_code_3_when_it_refuses(tmp_path: Path) -> None:
    """A DAG with an `evaluate` stage: after `posttrain run`, the check's verdict; a regression exits 3."""
    from helpers.tiny import tiny_raw

    root = tmp_path / "project"
    root.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=toy_env())
    (root / "dvc.yaml").write_text("stages:\n  evaluate:\n    cmd: python -c pass\n")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_raw(), sort_keys=False))  # tracking off
    models = {"grpo": ([], {"add3": 0.52}), "merge": (["grpo"], {"add3": 0.07})}
    for stage, (parents, _) in models.items():
        folder = root / "artifacts" / "models" / stage
        folder.mkdir(parents=True)
        entries = [{"stage": p, "path": f"artifacts/models/{p}", "content_hash": p} for p in parents]
        (folder / "lineage.json").write_text(json.dumps({"stage": stage, "content_hash": stage, "parents": entries}))
    scores = {
        stage: {
            "content_hash": stage,
            "domains": {d: {"exact_match": {"mean": m, "ci_low": m - 0.02, "ci_high": m + 0.02}} for d, m in s.items()},
        }
        for stage, (_, s) in models.items()
    }
    (root / "artifacts" / "metrics").mkdir(parents=True)
    (root / "artifacts" / "metrics" / "eval.json").write_text(json.dumps({"models": scores}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", toy_env()["PATH"])
        result = runner.invoke(app, ["run", "--no-prefect", "--root", str(root)])
        skipped = runner.invoke(app, ["run", "--no-prefect", "--no-promote", "--root", str(root)])
    assert result.exit_code == 3, result.output
    assert "[FAIL] not_worse_than.grpo.add3: parent 'grpo'" in result.output and "exit code 3" in result.output
    assert skipped.exit_code == 0, skipped.output
