"""User data that DVC must be able to see change: files are dvc.yaml deps, hub datasets are pinned.

A `kind: file` domain's file (or a hub id that is a local folder) is a dependency of `prepare` in
dvc.yaml: the stage spec lists it (posttrain.spec) and `posttrain sync-deps` / `posttrain run` write
it, so DVC reruns `prepare` when the file is edited; a stage refuses to run while dvc.yaml lacks
what it reads (posttrain.spec.check_declared). A hub dataset cannot be a file dependency: a hub id
must pin `revision`, or its content could change without any params change.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import DataConfig
from posttrain.errors import UndeclaredDataError


def unpinned_hub(data: DataConfig, root: Path) -> list[str]:
    """Keys of hub datasets (not local folders) without a `revision`: their content can change unseen."""
    keys = []
    for name, domain in data.domains.items():
        if domain.kind != "hub" or domain.revision is not None:
            continue
        local = Path(domain.name) if Path(domain.name).is_absolute() else root / domain.name
        if not local.exists():
            keys.append(f"data.domains.{name}.revision")
    return keys


def problems(data: DataConfig, root: Path) -> list[str]:
    """One line per unpinned hub dataset, with its fix."""
    return [
        f"{key}: not set; a hub dataset can change without DVC seeing it. Pin a commit or tag, e.g. "
        "revision: <commit sha>"
        for key in unpinned_hub(data, root)
    ]


def check(data: DataConfig, root: Path) -> None:
    """Refuse to prepare data whose source DVC cannot track (see the module docstring)."""
    found = problems(data, root)
    if found:
        raise UndeclaredDataError("; ".join(found))
