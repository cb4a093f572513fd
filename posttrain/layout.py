"""Where every stage reads and writes. One name per stage everywhere: module, params section,
dvc.yaml stage, Prefect task, MLflow run and artifacts folder.

    artifacts/data/prepared/<domain>/{train,val,test}.parquet   prepare
    artifacts/data/prepared/manifest.json                       prepare
    artifacts/data/mixtures/<stage>/{train.parquet,manifest.json}  mix@<stage>
    artifacts/models/<stage>/        save_pretrained folder + lineage.json   training stages, merge
    artifacts/metrics/<stage>.json   a stage's metrics                        every stage
    artifacts/metrics/eval.json      evaluation (documented schema)           evaluate
    artifacts/plots/                 PNG plots and plot data for `dvc plots`
    checkpoints/<stage>-<key>/       resumable checkpoints, NOT a DVC output (DVC deletes outs
                                     before rerunning a stage)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def prepared(self) -> Path:
        return self.artifacts / "data" / "prepared"

    def prepared_split(self, domain: str, split: str) -> Path:
        return self.prepared / domain / f"{split}.parquet"

    def mixture(self, stage: str) -> Path:
        return self.artifacts / "data" / "mixtures" / stage

    def model(self, stage: str) -> Path:
        # Variants (`sft@<name>`) live in one folder that merge and evaluate can depend on as a whole.
        if "@" in stage:
            return self.variants / stage
        return self.artifacts / "models" / stage

    @property
    def variants(self) -> Path:
        return self.artifacts / "variants"

    def metrics(self, stage: str) -> Path:
        return self.artifacts / "metrics" / f"{stage}.json"

    @property
    def plots(self) -> Path:
        return self.artifacts / "plots"

    def checkpoints(self, stage: str, key: str) -> Path:
        return self.root / "checkpoints" / f"{stage}-{key}"


def find_root(start: Path | None = None) -> Path:
    """The project root: the nearest folder upwards holding params.yaml and dvc.yaml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    return here
