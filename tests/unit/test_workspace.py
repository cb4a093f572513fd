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
