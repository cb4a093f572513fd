import subprocess
import sys
import textwrap
import time

import pytest

from posttrain.errors import WorkspaceBusy
from posttrain.pipeline.workspace import pipeline_lock


def test_second_run_refuses_with_holder_named(tmp_path):
    # The holder is a real second process, as two pipeline runs would be.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from pathlib import Path
                from posttrain.pipeline.workspace import pipeline_lock
                with pipeline_lock(Path({str(tmp_path)!r})):
                    print("locked", flush=True)
                    time.sleep(30)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(WorkspaceBusy, match=rf"pid {holder.pid} .*waited 1 s"):
            with pipeline_lock(tmp_path, wait_seconds=1.0, poll_seconds=0.1):
                pass
        assert time.monotonic() - started >= 1.0
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: the next run gets it at once.
    with pipeline_lock(tmp_path):
        pass


def test_waiting_run_proceeds_when_the_first_finishes(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from pathlib import Path; from posttrain.pipeline.workspace import pipeline_lock\n"
            f"with pipeline_lock(Path({str(tmp_path)!r})):\n    print('locked', flush=True); time.sleep(1.5)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pipeline_lock(tmp_path, wait_seconds=30, poll_seconds=0.1):
        assert holder.poll() is not None or holder.wait(5) == 0
    holder.wait()


def _holder(root):
    """A second process holding the workspace lock, as a pipeline run in progress would."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from pathlib import Path; from posttrain.pipeline.workspace import pipeline_lock\n"
            f"with pipeline_lock(Path({str(root)!r})):\n    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("command", [["run", "--set", "seed=5", "--no-prefect"], ["sync-deps"]])
def test_a_command_that_writes_params_or_dvc_yaml_waits_for_the_lock_first(tmp_path, command):
    """Defect: `run --set` wrote params.yaml (and dvc.yaml) before taking the lock, so a second --set during a
    run changed the recipe of the run in progress and only then said "workspace busy"."""
    import yaml
    from helpers.tiny import tiny_raw
    from typer.testing import CliRunner

    from posttrain.pipeline.cli import app

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw()))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    before = {name: (tmp_path / name).read_text() for name in ("params.yaml", "dvc.yaml")}
    holder = _holder(tmp_path)
    try:
        result = CliRunner().invoke(app, [*command, "--root", str(tmp_path)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1 and "another pipeline run holds" in result.output
    assert {name: (tmp_path / name).read_text() for name in before} == before  # nothing written


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    """`posttrain run` holds the lock while it writes params.yaml and dvc.yaml, then starts the flow, which
    takes it again in the same process."""
    with pipeline_lock(tmp_path):
        with pipeline_lock(tmp_path):
            pass
        holder = subprocess.run(
            [sys.executable, "-c", f"from pathlib import Path; from posttrain.pipeline.workspace import pipeline_lock\n"
             f"with pipeline_lock(Path({str(tmp_path)!r})):\n    pass"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert holder.returncode != 0 and "another pipeline run holds" in holder.stderr  # still held by this one
