"""Model merging, tensor by tensor, over safetensors files read lazily.

Methods (`MergeConfig.method`):

- `linear`: weighted average of the models (model soup); weights are normalised to sum 1.
- `task_arithmetic`: base + sum_i w_i * (model_i - base).
- `ties`: task vectors pruned to the top-`density` magnitudes, a sign elected per entry, and the
  entries agreeing with it averaged (TIES-Merging, Yadav et al. 2023), added to the base.
- `dare_linear` / `dare_ties`: task vectors randomly dropped with keep probability `density` and
  rescaled by 1/density (DARE, Yu et al. 2023), then combined linearly or with TIES' sign election.
- `slerp`: spherical interpolation between two models at `t`, per tensor; falls back to linear
  interpolation when the two tensors are (anti)parallel or zero, where the sphere formula is
  numerically meaningless.
- `checkpoint_average`: uniform average of a training stage's last K complete checkpoints (it reads
  checkpoints/, which is no DVC dependency; a trainer stage's `average_last` does the same inside
  the stage, over its own checkpoints).
- `adamerging`: task arithmetic whose coefficients are learned (posttrain/models/adamerging.py).

The arithmetic of task arithmetic, TIES and DARE is `peft.utils.merge_utils` (the code behind
PEFT's `add_weighted_adapter`), applied to full task vectors; SLERP and linear are a few lines here.

Merge only models of ONE fine-tuning line: models that share a parent (e.g. an SFT model and its
own GRPO fine-tune). Averaging two separately trained models, even from the same initialisation,
destroys them (measured: 0.914 exact match for SFT+its GRPO fine-tune, 0.002 for two independent
runs) because their weights live in different basins. `check_same_line` refuses such merges when
lineage records are available.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.errors import StageError
from posttrain.lineage import read_lineage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "checkpoint_average")
NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "adamerging")
SAME_LINE_HINT = (
    "merge only models of one fine-tuning line (models that share a parent, e.g. an SFT model and "
    "its own GRPO fine-tune); averaging separately trained models destroys them"
)
# Files of a save_pretrained folder that are not weights: copied from the first model.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
SLERP_DOT_THRESHOLD = 0.9995


# --------------------------------------------------------------------------- per-tensor methods


def _stack_weights(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.tensor(list(weights), dtype=like.dtype, device=like.device)


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * t_i / sum_i w_i."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"linear merge needs weights with a positive sum, got {list(weights)}")
    out = tensors[0] * (weights[0] / total)
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        out = out + tensor * (weight / total)
    return out


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    from peft.utils import merge_utils

    deltas = [t - base for t in tensors]
    return base + merge_utils.task_arithmetic(deltas, _stack_weights(weights, base))


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES: magnitude-prune each task vector to `density`, elect the sign by total mass, average
    the weighted entries that agree with it (PEFT's disjoint merge divides by their count)."""
    from peft.utils import merge_utils

    deltas = [t - base for t in tensors]
    if density >= 1.0:
        # peft's prune() warns and skips at density 1; do the same without the warning.
        import torch

        stacked = torch.stack(deltas)
        mask = merge_utils.calculate_majority_sign_mask(stacked, method="total")
        w = merge_utils.reshape_weight_task_tensors(stacked, _stack_weights(weights, base))
        return base + merge_utils.disjoint_merge(stacked * w, mask)
    return base + merge_utils.ties(deltas, _stack_weights(weights, base), density, majority_sign_method="total")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's RNG for DARE's random masks without disturbing the caller's RNG stream."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tensor_seed(seed: int, name: str) -> int:
    """One seed per tensor, derived from its name: masks do not depend on iteration order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def dare(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    *,
    seed: int,
    combine: str = "linear",
) -> torch.Tensor:
    """DARE: drop each task-vector entry with probability 1-density, rescale survivors by 1/density,
    then combine linearly (`dare_linear`) or with TIES' sign election (`dare_ties`)."""
    from peft.utils import merge_utils

    deltas = [t - base for t in tensors]
    w = _stack_weights(weights, base)
    with _seeded(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns at density 1 (no pruning), which is fine here
        if combine == "linear":
            return base + merge_utils.dare_linear(deltas, w, density)
        if combine == "ties":
            return base + merge_utils.dare_ties(deltas, w, density, majority_sign_method="total")
    raise ValueError(f"unknown DARE combination {combine!r}; expected 'linear' or 'ties'")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = SLERP_DOT_THRESHOLD) -> torch.Tensor:
    """Spherical interpolation of two tensors treated as flat vectors.

    The angle comes from the normalised vectors; the interpolation is applied to the original ones
    (as mergekit does), so t=0 gives `a` and t=1 gives `b` exactly. Near-parallel (|cos| above
    `dot_threshold`) or zero vectors fall back to linear interpolation.
    """
    import torch

    a32, b32 = a.double().flatten(), b.double().flatten()
    na, nb = a32.norm(), b32.norm()
    if na == 0 or nb == 0:
        return ((1 - t) * a32 + t * b32).reshape(a.shape).to(a.dtype)
    dot = torch.clamp((a32 / na) @ (b32 / nb), -1.0, 1.0)
    if abs(float(dot)) > dot_threshold:
        return ((1 - t) * a32 + t * b32).reshape(a.shape).to(a.dtype)
    theta = torch.arccos(dot)
    sin_theta = torch.sin(theta)
    s0 = torch.sin((1 - t) * theta) / sin_theta
    s1 = torch.sin(t * theta) / sin_theta
    return (s0 * a32 + s1 * b32).reshape(a.shape).to(a.dtype)


def merge_tensor(
    method: str,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    density: float = 0.5,
    t: float = 0.5,
    seed: int = 0,
    name: str = "",
) -> torch.Tensor:
    """Merge one tensor of every model with `method` (computed in float32, returned in input dtype)."""
    import torch

    dtype = tensors[0].dtype
    if not dtype.is_floating_point:
        # Integer buffers (position ids and the like) are not learnt: keep the first model's.
        return tensors[0]
    xs = [x.to(torch.float32) for x in tensors]
    b = base.to(torch.float32) if base is not None else None
    if method in NEEDS_BASE and b is None:
        raise ValueError(f"merge method '{method}' needs a base model")
    if method in ("linear", "checkpoint_average"):
        out = linear(xs, weights)
    elif method == "task_arithmetic":
        out = task_arithmetic(b, xs, weights)
    elif method == "ties":
        out = ties(b, xs, weights, density)
    elif method in ("dare_linear", "dare_ties"):
        out = dare(b, xs, weights, density, seed=tensor_seed(seed, name), combine=method.removeprefix("dare_"))
    elif method == "slerp":
        if len(xs) != 2:
            raise ValueError(f"slerp merges exactly two models; got {len(xs)}")
        out = slerp(xs[0], xs[1], t)
    else:
        raise ValueError(f"unknown merge method {method!r}; expected one of {list(METHODS)}")
    return out.to(dtype)


# --------------------------------------------------------------------------- lazy model files


class LazyWeights:
    """The tensors of a save_pretrained folder (single or sharded safetensors), read on demand."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if single.is_file():
            files = {None: single}
            self._where: dict[str, Any] = {}
        elif index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = {name: self.folder / name for name in sorted(set(weight_map.values()))}
            self._where = weight_map
        else:
            raise StageError(
                f"{self.folder}: no model.safetensors or model.safetensors.index.json; "
                "expected a save_pretrained folder with safetensors weights"
            )
        self._handles = {key: stack.enter_context(safe_open(str(path), framework="pt")) for key, path in files.items()}
        if None in self._handles:
            self._where = {name: None for name in self._handles[None].keys()}

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._handles[self._where[name]].get_slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)


# --------------------------------------------------------------------------- compatibility


_CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "architectures"}


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; expected a save_pretrained model folder")
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in _CONFIG_KEYS_IGNORED}


def _tokenizer_fingerprint(folder: Path) -> str | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    # The vocabulary, merges and special tokens decide token ids; padding/truncation settings don't.
    model = data.get("model", {})
    keep = {"vocab": model.get("vocab"), "merges": model.get("merges"), "added": data.get("added_tokens")}
    return json.dumps(keep, sort_keys=True)


def check_compatible(first: LazyWeights, others: Sequence[LazyWeights], *, configs: bool = True) -> None:
    """Same architecture, tensor names, shapes and tokenizer, or a StageError naming the difference."""
    first_keys = set(first.keys())
    first_cfg = _config(first.folder) if configs else None
    first_tok = _tokenizer_fingerprint(first.folder)
    for other in others:
        keys = set(other.keys())
        if keys != first_keys:
            missing, extra = sorted(first_keys - keys)[:5], sorted(keys - first_keys)[:5]
            raise StageError(
                f"cannot merge {other.folder} with {first.folder}: different tensors "
                f"(missing {missing}, extra {extra}); expected the same architecture; {SAME_LINE_HINT}"
            )
        for name in sorted(first_keys):
            if first.shape(name) != other.shape(name):
                raise StageError(
                    f"cannot merge {other.folder} with {first.folder}: tensor {name} has shape "
                    f"{list(other.shape(name))}, expected {list(first.shape(name))}; {SAME_LINE_HINT}"
                )
        if configs:
            cfg = _config(other.folder)
            diff = sorted(k for k in set(cfg) | set(first_cfg) if cfg.get(k) != first_cfg.get(k))
            if diff:
                shown = {k: (first_cfg.get(k), cfg.get(k)) for k in diff[:5]}
                raise StageError(
                    f"cannot merge {other.folder} with {first.folder}: config.json differs in {shown} "
                    f"(first, other); {SAME_LINE_HINT}"
                )
            tok = _tokenizer_fingerprint(other.folder)
            if first_tok is not None and tok is not None and tok != first_tok:
                raise StageError(
                    f"cannot merge {other.folder} with {first.folder}: tokenizer.json vocabularies differ "
                    f"(token ids would mean different things); {SAME_LINE_HINT}"
                )


def check_compatible_folders(folders: Sequence[Path]) -> None:
    """`check_compatible` on model folders: the first against the others."""
    with ExitStack() as stack:
        weights = [LazyWeights(Path(folder), stack) for folder in folders]
        check_compatible(weights[0], weights[1:])


def _ancestors(folder: Path, root: Path, depth: int = 32) -> set[str] | None:
    """Content hashes of a model and of its ancestors that are still on disk unchanged.

    None when the model has no lineage record (a user's own folder: nothing to check)."""
    lineage = read_lineage(folder)
    if lineage is None:
        return None
    seen = {lineage.get("content_hash")}
    frontier = [lineage]
    while frontier and depth > 0:
        depth -= 1
        nxt = []
        for record in frontier:
            for parent in record.get("parents", []):
                seen.add(parent.get("content_hash"))
                path = Path(parent.get("path", ""))
                path = path if path.is_absolute() else root / path
                parent_lineage = read_lineage(path) if path.is_dir() else None
                # Follow a parent only if the folder still holds the model the child was made from.
                if parent_lineage and parent_lineage.get("content_hash") == parent.get("content_hash"):
                    nxt.append(parent_lineage)
        frontier = nxt
    seen.discard(None)
    return seen


def check_same_line(folders: Sequence[Path], root: Path) -> None:
    """Refuse to merge models that share no ancestor according to their lineage records."""
    sets = [(f, _ancestors(Path(f), root)) for f in folders]
    known = [(f, s) for f, s in sets if s is not None]
    if len(known) < 2:
        return
    common = set.intersection(*(s for _, s in known))
    if not common:
        names = ", ".join(str(f) for f, _ in known)
        raise StageError(f"cannot merge {names}: their lineage records share no ancestor; {SAME_LINE_HINT}")


# --------------------------------------------------------------------------- checkpoints


def complete_checkpoints(checkpoint_root: Path) -> list[Path]:
    """`checkpoint-<step>` folders holding the COMPLETE marker, by step."""
    found = []
    for path in checkpoint_root.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if path.is_dir() and step.isdigit() and (path / "COMPLETE").is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def last_checkpoints(root: Path, stage: str, last_k: int) -> list[Path]:
    """The last `last_k` complete checkpoints of `stage`, from the newest `checkpoints/<stage>-*`."""
    candidates = [p for p in (root / "checkpoints").glob(f"{stage}-*") if p.is_dir()]
    if not candidates:
        raise StageError(
            f"no checkpoint folder {root / 'checkpoints'}/{stage}-*; checkpoint_average needs the "
            f"'{stage}' stage to have saved checkpoints (trainer.save_steps)"
        )
    latest = max(candidates, key=lambda p: p.stat().st_mtime)
    found = complete_checkpoints(latest)
    if not found:
        raise StageError(f"{latest}: no complete checkpoint (checkpoint-<step>/ with a COMPLETE marker)")
    if len(found) < last_k:
        log.warning("%s: only %d complete checkpoints, averaging those (last_k=%d)", latest, len(found), last_k)
    return found[-last_k:]


# --------------------------------------------------------------------------- whole models


def merge_models(
    model_dirs: Sequence[Path],
    out_dir: Path,
    *,
    method: str,
    weights: Sequence[float] | None = None,
    base_dir: Path | None = None,
    density: float = 0.5,
    t: float = 0.5,
    seed: int = 0,
    files_from: Path | None = None,
    check_configs: bool = True,
) -> dict[str, Any]:
    """Merge `model_dirs` (save_pretrained folders) into `out_dir`, one tensor at a time.

    Only one tensor per model is in memory at once, plus the merged model being built. Config,
    generation config and tokenizer files are copied from `files_from` (default: the first model).
    Returns merge statistics (weights used, tensor and parameter counts, L2 distance of the merged
    model to each input, seconds).
    """
    import torch
    from safetensors.torch import save_file

    if method not in METHODS:
        raise StageError(f"unknown merge method {method!r}; expected one of {list(METHODS)}")
    model_dirs = [Path(d) for d in model_dirs]
    if not model_dirs:
        raise StageError("nothing to merge: no models given")
    if method == "slerp" and len(model_dirs) != 2:
        raise StageError(f"slerp merges exactly two models; got {len(model_dirs)}")
    if method in NEEDS_BASE and base_dir is None:
        raise StageError(f"merge method '{method}' needs a base model (merge.base: the common ancestor stage)")
    if weights is None:
        # Averages: equal shares. Task-vector methods: each task vector at full strength.
        weights = [1.0] * len(model_dirs)
    weights = [float(w) for w in weights]
    if len(weights) != len(model_dirs):
        raise StageError(f"{len(weights)} merge weights for {len(model_dirs)} models; expected one per model")
    if not 0 < density <= 1:
        raise StageError(f"merge density {density} is outside (0, 1]")

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged: dict[str, torch.Tensor] = {}
    sq_dist = [0.0] * len(model_dirs)
    n_params = 0
    with ExitStack() as stack:
        models = [LazyWeights(d, stack) for d in model_dirs]
        base = LazyWeights(base_dir, stack) if base_dir is not None and method in NEEDS_BASE else None
        check_compatible(models[0], models[1:] + ([base] if base else []), configs=check_configs)
        for name in models[0].keys():
            tensors = [m.get(name) for m in models]
            out = merge_tensor(
                method,
                tensors,
                weights=weights,
                base=base.get(name) if base else None,
                density=density,
                t=t,
                seed=seed,
                name=name,
            )
            if out.dtype.is_floating_point and not torch.isfinite(out).all():
                raise StageError(f"merged tensor {name} has NaN/inf values (method {method})")
            for i, x in enumerate(tensors):
                if x.dtype.is_floating_point:
                    sq_dist[i] += float((out.double() - x.double()).pow(2).sum())
            n_params += out.numel()
            merged[name] = out.contiguous()
        save_file(merged, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    source = Path(files_from) if files_from is not None else model_dirs[0]
    for path in sorted(source.iterdir()):
        if (
            path.is_file()
            and path.name not in WEIGHT_FILES
            and path.name != "lineage.json"
            and (path.suffix in (".json", ".txt", ".model", ".jinja") or path.name.startswith("tokenizer"))
        ):
            shutil.copy2(path, out_dir / path.name)
    return {
        "method": method,
        "models": [str(d) for d in model_dirs],
        "weights": weights,
        "base": str(base_dir) if base_dir is not None and method in NEEDS_BASE else None,
        "density": density if method in ("ties", "dare_linear", "dare_ties") else None,
        "t": t if method == "slerp" else None,
        "seed": seed if method.startswith("dare") else None,
        "tensors": len(merged),
        "parameters": n_params,
        "l2_distance_to_inputs": [math.sqrt(d) for d in sq_dist],
        "seconds": round(time.perf_counter() - started, 3),
    }
