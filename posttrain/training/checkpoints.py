"""Checkpoints of a training stage: their key, the COMPLETE marker, resume, cleaning, and reading their trainer state.

`checkpoints/<stage>-<key>/checkpoint-<step>/`. The key hashes everything that determines the run's
result (this module is the one place that derives it):

    code      the contents of the stage's code deps (its StageSpec, posttrain.spec: files, and
              folders recursively without __pycache__/*.pyc), i.e. the same files DVC hashes to
              decide the stage is stale; a variant has its stage's code
    params    the values the stage runs with, by the params keys of its spec (a variant: its own
              merged section and seed)
    inputs    the caller's: data manifest and parent model content hashes, world size, device,
              precision, thread count, seed, the stage's typed section

So a checkpoint whose code, params or inputs differ from this run's is never resumed. Each key folder
holds `key.json` with those components, so the log can say why an existing folder was skipped.

A checkpoint counts only once `CheckpointMarker` has written COMPLETE into it (HF checkpoints are
not atomic); resume picks the newest complete one and removes half-written ones.

Cleaning rule: at a stage's start the newest KEEP_KEYS key folders of that stage (by modification
time, the current key always among them) are kept and older ones deleted; `posttrain clean` applies
the same rule to every stage, `posttrain clean --all` deletes every checkpoint.
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

from posttrain.config import Params, params_hash
from posttrain.errors import ParamsError, StageError
from posttrain.io import sha256_file, write_json_atomic
from posttrain.models.merging import complete_checkpoints
from posttrain.spec import CODE_ROOT, StageSpec, effective_values

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
KEY_FILE = "key.json"
KEEP_KEYS = 2  # key folders kept per stage: the current run's and the one before it


def code_hashes(root: Path, deps: list[str]) -> dict[str, str]:
    """sha256 of every file of the code deps, by path relative to root (folders walked recursively)."""
    hashes: dict[str, str] = {}
    for dep in deps:
        path = root / dep
        if path.is_file():
            hashes[dep] = sha256_file(path)
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                if "__pycache__" in file.parts or file.suffix == ".pyc":
                    continue
                hashes[file.relative_to(root).as_posix()] = sha256_file(file)
        else:
            raise ParamsError(f"{path}: a code dep of the stage does not exist")
    return hashes


def key_components(
    spec: StageSpec, params: Params, inputs: dict[str, Any], code_root: Path = CODE_ROOT
) -> dict[str, Any]:
    """What the key hashes: the spec's code file hashes, the values it runs with, and the caller's inputs.

    `code_root`: where the code that runs lives, by default the folder this package was imported from (the
    project root in a DVC project; a test's temporary project runs the repository's code).
    """
    return {
        "stage": spec.name,
        "code": code_hashes(code_root, list(spec.code_deps)),
        "params": effective_values(spec, params),
        "inputs": inputs,
    }


def key_of(components: dict[str, Any]) -> str:
    return params_hash(components)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable reasons two key components differ, e.g. 'code posttrain/adapters.py changed'."""
    reasons: list[str] = []
    for part in ("code", "params", "inputs"):
        a, b = old.get(part) or {}, new.get(part) or {}
        for name in sorted(set(a) | set(b)):
            if name not in a:
                reasons.append(f"{part} {name} added")
            elif name not in b:
                reasons.append(f"{part} {name} removed")
            elif a[name] != b[name]:
                reasons.append(f"{part} {name} changed")
    return reasons or ["key differs (made by an older key scheme)"]


def stage_folders(checkpoints: Path, stage: str) -> list[Path]:
    """Key folders of `stage` under checkpoints/, newest first (by modification time)."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.rsplit("-", 1)[0] == stage]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def prepare_folder(folder: Path, components: dict[str, Any], *, clean: bool, keep: int = KEEP_KEYS) -> None:
    """Before training: log why other key folders of the stage are not resumed, record this key's
    components in the folder, and (with `clean`, the main process) apply the cleaning rule."""
    stage = components["stage"]
    for other in stage_folders(folder.parent, stage):
        if other == folder:
            continue
        try:
            reasons = _differences(json.loads((other / KEY_FILE).read_text()), components)
        except (OSError, json.JSONDecodeError):
            reasons = [f"no readable {KEY_FILE} (made by an older key scheme)"]
        log.info("%s: checkpoint folder %s skipped, made from other inputs: %s", stage, other, "; ".join(reasons))
    if clean:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / KEY_FILE, components)  # also marks this key as the newest
        clean_stage(folder.parent, stage, keep=keep)


def clean_stage(checkpoints: Path, stage: str, keep: int = KEEP_KEYS) -> list[Path]:
    """Delete all but the newest `keep` key folders of `stage`; returns the deleted folders."""
    removed = stage_folders(checkpoints, stage)[keep:]
    for folder in removed:
        log.info("%s: removing old checkpoint folder %s (keeping the newest %d keys)", stage, folder, keep)
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def clean(checkpoints: Path, keep: int = KEEP_KEYS, everything: bool = False) -> list[Path]:
    """`posttrain clean`: the cleaning rule for every stage, or (`everything`) remove all checkpoints."""
    if not checkpoints.is_dir():
        return []
    if everything:
        removed = sorted(p for p in checkpoints.iterdir())
        shutil.rmtree(checkpoints)
        return removed
    stages = sorted({p.name.rsplit("-", 1)[0] for p in checkpoints.iterdir() if p.is_dir()})
    return [path for stage in stages for path in clean_stage(checkpoints, stage, keep=keep)]


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


def average_last_checkpoints(model: Any, folder: Path, last_k: int) -> list[str]:
    """Load into `model` the uniform average of the last `last_k` complete checkpoints under `folder`
    (the stage's own run); returns their names. StageError when fewer than `last_k` exist."""
    import torch
    from safetensors.torch import load_file

    found = complete_checkpoints(folder)[-last_k:]
    if len(found) < last_k:
        raise StageError(
            f"average_last: {last_k} checkpoints requested, {len(found)} complete under {folder}; "
            "expected trainer.save_steps to save at least that many"
        )
    total: dict[str, torch.Tensor] = {}
    for checkpoint in found:
        for name, tensor in load_file(str(checkpoint / "model.safetensors")).items():
            total[name] = total.get(name, 0) + tensor.double() / last_k
    state = {name: tensor.to(model.state_dict()[name].dtype) for name, tensor in total.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise StageError(
            f"average_last: checkpoint tensors do not match the model (missing {missing}, extra {unexpected})"
        )
    return [checkpoint.name for checkpoint in found]
