"""Checks `posttrain validate` and `posttrain run` make beyond the params schema (posttrain.config).

They need the project folder, a library heavier than the schema may import, or a look at the
data; each names the key and what is allowed, so a recipe fails before any stage runs:

    dvc.yaml behind the recipe (its chain, data files, params) (posttrain.spec.drift)
    unpinned hub datasets                                  (posttrain.data.userdeps)
    orchestration.continual.cron                           (Prefect's own cron parser)
    model.tokenizer.vocab_size below the data's alphabet   (synthetic domains: known before prepare)
    <stage>.trainer keys TRL's config class does not have  (imports trl: only when asked)
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from posttrain import spec
from posttrain.config import Params
from posttrain.data import domains, splits, userdeps
from posttrain.models.build import SPECIAL_TOKENS

# The TRL config class each training stage builds (stages/*.py).
TRL_CONFIGS = {
    "pretrain": "SFTConfig",
    "cpt": "SFTConfig",
    "sft": "SFTConfig",
    "dpo": "DPOConfig",
    "grpo": "GRPOConfig",
}


def _prefect_croniter() -> Any:
    """The croniter Prefect vendors and validates deployments with, loaded from its file so that
    `posttrain validate` does not import Prefect (seconds); it needs only pytz and dateutil."""
    spec = importlib.util.find_spec("prefect")  # finds, does not import, a top-level package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "_vendor" / "croniter" / "croniter.py"
    loaded = importlib.util.spec_from_file_location("posttrain_vendored_croniter", path)
    if loaded is None or loaded.loader is None or not path.is_file():
        return None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module.croniter


def cron_problem(cron: str) -> str | None:
    """Prefect's own rule (prefect._internal.schemas.validators.validate_cron_string)."""
    croniter = _prefect_croniter()
    if croniter is None:
        return None  # no Prefect installed: `posttrain deploy` cannot run anyway
    # Prefect also refuses croniter's random (R) and hashed (H) fields.
    if not croniter.is_valid(cron) or any(part.casefold() in ("r", "h") for part in cron.split()):
        return f"orchestration.continual.cron: got {cron!r}, not a valid cron expression; expected five fields, e.g. '0 2 * * *'"
    return None


def vocab_problem(params: Params) -> str | None:
    """The scratch tokenizer keeps every character it sees: a smaller vocab_size is silently exceeded."""
    if params.model.base != "scratch":
        return None
    chars: set[str] = set()
    for name, config in params.data.domains.items():
        if config.kind in domains.GENERATOR_KINDS:
            quiet = domains.log
            level = quiet.level
            quiet.setLevel(logging.ERROR)  # its "space smaller than n_items" note is prepare's to log
            try:
                records = domains.generate(name, config, params.data.seed, config.verifier)
            finally:
                quiet.setLevel(level)
            split = params.data.split
            train = splits.split_records(records, split.salt, split.val_fraction, split.test_fraction)["train"]
            chars.update(*(record["text"] for record in train))
    specials = len(SPECIAL_TOKENS) + int(params.model.tokenizer.bos)
    needed = len(chars) + specials
    if params.model.tokenizer.vocab_size < needed:
        return (
            f"model.tokenizer.vocab_size: got {params.model.tokenizer.vocab_size}, but the synthetic domains use "
            f"{len(chars)} distinct characters plus {specials} special tokens; expected at least {needed}"
        )
    return None


def trainer_key_problems(params: Params, stages: list[str]) -> list[str]:
    """Unknown trainer keys of `stages`, checked before a run starts (imports trl: ~8 s)."""
    import trl

    from posttrain.training.trl_config import unknown_trainer_keys  # lazy: imports trl and transformers

    lines = []
    for stage in stages:
        config_cls = getattr(trl, TRL_CONFIGS[stage])
        lines += unknown_trainer_keys(config_cls, stage, params.stage_section(stage).trainer.model_dump())
    return lines


def problems(params: Params, root: Path, drift: bool = True) -> list[str]:
    """Everything `posttrain validate` refuses beyond the schema, one line each (`drift`: also report
    dvc.yaml stages that differ from the recipe; `posttrain run` rewrites them instead)."""
    found = spec.drift(params, root) if drift else []
    found += userdeps.problems(params.data, root)
    for problem in (cron_problem(params.orchestration.continual.cron), vocab_problem(params)):
        if problem:
            found.append(problem)
    return found
