"""Checkpoints of a training stage: their key, the COMPLETE marker, resume, and reading their trainer state.

`checkpoints/<stage>-<key>/checkpoint-<step>/`: the key hashes everything that determines the run;
a checkpoint counts only once `CheckpointMarker` has written COMPLETE into it (HF checkpoints are
not atomic); resume picks the newest complete one and removes half-written ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from posttrain.config import TrainStageConfig, params_hash

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_key(stage: str, section: TrainStageConfig, *, seed: int, inputs: dict[str, Any]) -> str:
    """Hash of everything that determines a run: the stage's params, the seed and its inputs' content hashes.

    A checkpoint is only resumed by a run with the same key; changing a param or an input starts fresh.
    """
    return params_hash({"stage": stage, "section": section.model_dump(mode="json"), "seed": seed, "inputs": inputs})


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def find_resume_checkpoint(folder: Path, *, remove_incomplete: bool = False) -> Path | None:
    """The newest checkpoint under `folder` holding the COMPLETE marker (None if there is none).

    Checkpoints without the marker were cut off mid-save (HF checkpoints are not atomic); they are
    skipped, and with `remove_incomplete` deleted so the Trainer does not write into them later.
    """
    newest: Path | None = None
    for _step, path in _checkpoints(folder):
        if (path / COMPLETE_MARKER).is_file():
            newest = path
        else:
            log.warning("checkpoint %s has no %s marker (half-written); skipped", path, COMPLETE_MARKER)
            if remove_incomplete:
                shutil.rmtree(path, ignore_errors=True)
    return newest


class CheckpointMarker(TrainerCallback):
    """Write COMPLETE into a checkpoint once the Trainer has fully saved it (on_save runs after the save)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Distributed: every rank writes part of a checkpoint (its RNG state, optimizer shards);
        # it is complete only once all have finished, and only rank 0 marks it.
        _barrier()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not folder.is_dir():
            return
        marker = folder / COMPLETE_MARKER
        marker.write_text(json.dumps({"step": state.global_step, "time": time.time()}) + "\n")
        _fsync(marker)


def _barrier() -> None:
    # lazy: torch takes seconds to import; only model code paths need it
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tokens_at(checkpoint: Path | None) -> int:
    """Input tokens the Trainer had seen when it saved `checkpoint` (0 for None or no trainer state)."""
    if checkpoint is None or not (checkpoint / "trainer_state.json").is_file():
        return 0
    return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))


def training_series(checkpoint: Path, keys: tuple[str, ...], prefixes: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """TRL's logged values per logging step (`keys`, and keys starting with `prefixes`), from a checkpoint's
    trainer_state.json.

    Read from the final checkpoint, this is the whole run's series: the Trainer always saves at the last
    step, and a resumed run's state carries the history from before the interruption.
    """
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        return []
    history = json.loads(state_file.read_text()).get("log_history", [])
    return [
        {"step": e["step"], **{k: v for k, v in e.items() if k in keys or (prefixes and k.startswith(prefixes))}}
        for e in history
        if any(k in e for k in keys)
    ]
