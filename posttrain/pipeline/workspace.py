"""One pipeline run at a time per workspace.

Two runs in one checkout would race on the same outputs, DVC's lock and the registry. The second
run waits for the first (up to `wait_seconds`) and then refuses with a message naming the holder.
The lock is an advisory `flock` on a file under .dvc/tmp: the kernel releases it when the holder
dies, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from posttrain.errors import WorkspaceBusy

LOCK_NAME = "posttrain-pipeline.lock"


# Workspaces whose lock this process holds, with the nesting depth: a command that holds the lock
# while it writes params.yaml/dvc.yaml goes on to start the flow, which takes the same lock again.
_held: dict[Path, int] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def pipeline_lock(root: Path, wait_seconds: float = 0.0, poll_seconds: float = 0.5) -> Iterator[None]:
    """Hold the workspace's lock (re-entrant within one process; other processes wait or are refused)."""
    key = Path(root).resolve()
    with _held_guard:
        nested = key in _held
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    with _flock(key, wait_seconds, poll_seconds):
        with _held_guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_guard:
                del _held[key]


@contextlib.contextmanager
def _flock(root: Path, wait_seconds: float, poll_seconds: float) -> Iterator[None]:
    path = Path(root) / ".dvc" / "tmp" / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown process"
                    raise WorkspaceBusy(
                        f"another pipeline run holds {root} ({holder}); waited {wait_seconds:.0f} s. "
                        "Wait for it to finish, or pass a longer --wait."
                    ) from None
                time.sleep(poll_seconds)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the flock
