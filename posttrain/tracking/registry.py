"""Model registry: one registered model per recipe, a version per stage model, promotion of one champion by rules.

The recipe's registered model is `tracking.registered_model_prefix` (default `posttrain`). Every model a
stage writes becomes a version of it, tagged with its stage (`posttrain.stage`: `sft`, `sft@arith`,
`merge`), stage module and variant, content hash and lineage; a rerun that writes identical content for
the same stage finds its version instead of adding one. Aliases:

- `candidate`: the version the promotion rule picks (`promotion.candidate`), set once `evaluate` ran;
- `champion`: the one model to serve: `models:/<prefix>@champion`;
- `previous-champion`: the champion before it; the whole champion history is a tag of the model, and
  `rollback` moves `champion` back along it.

`promote` judges a version on its own evaluation (posttrain.scoring.report: the workspace's eval.json
when it holds that version's content, else the copy logged with the evaluate run whose scores the
version carries) with the rules of posttrain.tracking.rules, against its own lineage and the current
champion of the same registered model, whatever stage the champion came from. Two `promote` commands
at once are serialised by a lock held in the registry itself (a registered model named
`<prefix>.promotion-lock`, created and deleted atomically by the tracking store): the second waits, and
when the first moved `champion` meanwhile, it refuses (its decision was taken against the old champion)
and says to run it again.

A store written by an older posttrain holds one registered model per stage (`<prefix>-<stage>`): it is
refused until `posttrain registry --migrate` copies those versions into the recipe's model (the old
models are kept, no version or alias is lost).

`import mlflow` stays inside functions: the CLI imports this module lazily, but cheaply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import MODEL_STAGES, Params
from posttrain.errors import PromotionError
from posttrain.io import redact
from posttrain.layout import Layout
from posttrain.lineage import content_hash, file_hashes, library_versions, read_lineage
from posttrain.scoring import seeds
from posttrain.scoring.report import EvalReport, workspace_report
from posttrain.spec import split_name
from posttrain.tracking import modelcard
from posttrain.tracking.client import TAG, connect, lineage_tags, retry_locked
from posttrain.tracking.rules import Champion, Check, Verdict, candidate_stage, checks_for, decide

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger("posttrain.tracking.registry")

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous-champion"
EVAL_TAG = TAG + "eval"
HISTORY_TAG = TAG + "champion_history"
ROLLED_BACK_TAG = TAG + "rolled_back"  # kept when the status tag changes later
STAGE_TAG = TAG + "stage"
CONTENT_TAG = TAG + "content_hash"
MIGRATED_TAG = TAG + "migrated_from"
LOCK_SUFFIX = ".promotion-lock"
LOCK_STALE_SECONDS = 600.0  # a lock older than this was left by a killed `promote`: it is broken


def _ver(model_version: Any) -> str:
    """A version number as a string (MLflow returns ints here and strings there)."""
    return str(model_version.version)


def registered_model_name(params: Params) -> str:
    """The recipe's one registered model."""
    return params.tracking.registered_model_prefix


# --------------------------------------------------------------------------- versions


def _exists(client: MlflowClient, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        retry_locked(client.get_registered_model, name)
        return True
    except MlflowException:
        return False


def legacy_models(client: MlflowClient, params: Params) -> list[str]:
    """Registered models of an older posttrain in this store: one per stage, `<prefix>-<stage>`."""
    prefix = registered_model_name(params)
    return [f"{prefix}-{stage}" for stage in MODEL_STAGES if _exists(client, f"{prefix}-{stage}")]


def _check_not_legacy(client: MlflowClient, params: Params) -> None:
    name = registered_model_name(params)
    if _exists(client, name) and retry_locked(client.get_registered_model, name).tags.get(MIGRATED_TAG):
        return
    old = legacy_models(client, params)
    if old:
        raise PromotionError(
            f"the MLflow store {redact(client.tracking_uri)} holds per-stage registered models {old} written by an "
            f"older posttrain; this version keeps one registered model per recipe ('{name}'). Run "
            "`posttrain registry --migrate` to copy their versions and aliases into it (the old models are kept), "
            "or set tracking.registered_model_prefix to a new name"
        )


def _ensure_registered_model(client: MlflowClient, params: Params) -> str:
    from mlflow.exceptions import MlflowException

    name = registered_model_name(params)
    _check_not_legacy(client, params)
    if not _exists(client, name):
        try:
            retry_locked(client.create_registered_model, name, description=f"posttrain recipe '{name}'")
        except MlflowException:  # created by a parallel stage meanwhile
            retry_locked(client.get_registered_model, name)
    return name


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    quoted = name.replace("'", "\\'")
    versions = retry_locked(client.search_model_versions, f"name = '{quoted}'", max_results=1000)
    return sorted(versions, key=lambda v: int(_ver(v)))


def find_version(client: MlflowClient, name: str, stage: str, content: str | None) -> ModelVersion | None:
    """The newest version of `name` holding `stage`'s model with content hash `content`."""
    if not content or not _exists(client, name):
        return None
    matches = [
        v for v in _versions(client, name) if v.tags.get(CONTENT_TAG) == content and v.tags.get(STAGE_TAG) == stage
    ]
    return matches[-1] if matches else None


def parent_versions(client: MlflowClient, params: Params, lineage: dict[str, Any]) -> list[str]:
    """'<name>/<version> (<stage>)' of each parent model in `lineage` that is in the registry."""
    name = registered_model_name(params)
    found = []
    for parent in lineage.get("parents") or []:
        stage = parent.get("stage")
        if not stage:
            continue
        version = find_version(client, name, stage, parent.get("content_hash"))
        found.append(f"{name}/{_ver(version)} ({stage})" if version else f"{stage} (not registered)")
    return found


def _stage_chain(client: MlflowClient, params: Params, stage: str, lineage: dict[str, Any]) -> str:
    """'pretrain > cpt > sft' through the parents' versions; merges show their inputs in brackets."""
    name = registered_model_name(params)
    chains = []
    for parent in lineage.get("parents") or []:
        version = find_version(client, name, str(parent.get("stage")), parent.get("content_hash"))
        chains.append((version.tags.get(TAG + "stages") if version else None) or str(parent.get("stage")))
    if not chains:
        return stage
    return f"{chains[0]} > {stage}" if len(chains) == 1 else f"[{' | '.join(chains)}] > {stage}"


def _pip_requirements() -> list[str]:
    # Explicit: MLflow's inference of requirements pulls in torchvision and fails (STACK-NOTES).
    versions = library_versions()
    pins = [
        f"{lib}=={versions[lib].split('+')[0]}" for lib in ("torch", "transformers", "tokenizers") if lib in versions
    ]
    return [*pins, "safetensors", "accelerate"]


def _signature() -> Any:
    """Text in, text out, with generation settings accepted at predict time by the pyfunc flavour."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 8), ParamSpec("do_sample", "boolean", False)]),
    )


def _set_description(client: MlflowClient, name: str, version: str) -> None:
    current = retry_locked(client.get_model_version, name, version)
    card = modelcard.build_model_card(name, version, current.tags)
    if current.description != card:
        retry_locked(client.update_model_version, name, version, description=card)


def register_stage_model(
    client: MlflowClient,
    params: Params,
    root: Path,
    stage: str,
    run_id: str,
    model_dir: Path,
    lineage: dict[str, Any],
) -> ModelVersion:
    """Log `model_dir` with the transformers flavour under `run_id` and make it a version of the recipe's model.

    Loading it back is one call: `mlflow.transformers.load_model("models:/<name>@<alias>")` returns a
    text-generation pipeline (`mlflow.pyfunc.load_model` also works; `predict` takes
    `params={"max_new_tokens": ...}`).
    """
    import mlflow
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = _ensure_registered_model(client, params)
    content = lineage.get("content_hash") or content_hash(file_hashes(model_dir))
    version = find_version(client, name, stage, content)
    if version is not None:
        log.info(
            "%s: %s content %s is already version %s; not registered again", name, stage, content[:12], _ver(version)
        )
        return version
    kind, variant = split_name(stage)
    tags = {
        **lineage_tags(lineage),
        CONTENT_TAG: content,
        STAGE_TAG: stage,
        TAG + "stage_module": kind,
        TAG + "variant": variant or "",
        TAG + "run_id": run_id,
        # How the version loads and generates: the transformers flavour (evaluate records its own engine).
        TAG + "engine": "transformers",
        TAG + "stages": _stage_chain(client, params, stage, lineage),
    }
    inputs = parent_versions(client, params, lineage)
    if inputs:
        tags[TAG + "input_models"] = ", ".join(inputs)
    trust = params.model.trust_remote_code
    components = {
        "model": AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust),
        "tokenizer": AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust),
    }
    # The artifacts are logged first and the version created only once they are all stored: a failed upload
    # (artifact store unreachable) leaves no half-registered version behind.
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            components,
            name="model",
            task="text-generation",
            pip_requirements=_pip_requirements(),
            signature=_signature(),
            # A card of our own: MLflow would otherwise try to fetch one from the Hub.
            model_card=ModelCard(
                "---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n"
                + modelcard.build_model_card(name, None, tags)
            ),
        )
    version = retry_locked(
        client.create_model_version,
        name=name,
        source=info.model_uri,
        run_id=run_id,  # keeps the run link (registering runs:/ folders fails in MLflow 3)
        tags=tags,
        model_id=info.model_id,
    )
    _set_description(client, name, _ver(version))
    return retry_locked(client.get_model_version, name, _ver(version))


def load_registered_model(model_uri: str) -> Any:
    """A registered version for serving: `mlflow.transformers.load_model(model_uri)` (a text-generation
    pipeline), refused unless its tokenizer's chat template has the fingerprint the version was registered
    with (tag `posttrain.chat_template_fingerprint`, from lineage.json). A template swapped in the registry's
    copy would make the model chat in a format it was never trained on. Uses MLflow's current tracking and
    registry URIs (`mlflow.set_tracking_uri`, `MLFLOW_TRACKING_URI`)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    # lazy: keeps posttrain.models out of what every stage loads through the tracking package (DVC deps)
    from posttrain.models import chat_template

    client = MlflowClient()
    name, version = get_model_name_and_version(client, model_uri)
    recorded = retry_locked(client.get_model_version, name, version).tags.get(TAG + chat_template.LINEAGE_KEY)
    generator = mlflow.transformers.load_model(model_uri)
    if recorded in (None, "", "None"):
        log.warning("%s: version %s has no chat-template fingerprint tag; template not checked", name, version)
        return generator
    chat_template.check_same_template(
        chat_template.fingerprint(generator.tokenizer),
        recorded,
        child_name=f"{model_uri} (its tokenizer, version {version})",
        parent_name=f"the registered version's tag {TAG}{chat_template.LINEAGE_KEY}",
    )
    return generator


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return retry_locked(client.get_model_version_by_alias, name, alias)
    except MlflowException:
        return None


def _set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    current = _alias(client, name, alias)
    if current is None or _ver(current) != str(version):
        retry_locked(client.set_registered_model_alias, name, alias, str(version))


def _set_tags(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> bool:
    """Set only tags whose value differs (so repeating an operation changes nothing). True if any did."""
    current = retry_locked(client.get_model_version, name, version).tags
    changed = {key: value for key, value in tags.items() if current.get(key) != value}
    for key, value in changed.items():
        retry_locked(client.set_model_version_tag, name, version, key, value)
    return bool(changed)


# --------------------------------------------------------------------------- evaluation


def _eval_record(report: EvalReport, stage: str, run_id: str) -> dict[str, Any]:
    """What a version carries of its evaluation: its scores and where the whole report is (the run)."""
    model = report.models[stage]
    forgetting = {}
    for domain, value in model.forgetting.items():
        number = value.get("value") if isinstance(value, dict) else value
        if isinstance(number, (int, float)):
            forgetting[domain] = number
    return {
        "stage": stage,
        "run_id": run_id,
        "engine": report.engine_of(stage),
        "confidence": report.bootstrap[1],
        "prepared_manifest_hash": report.prepared_manifest_hash,
        "exact_match": {d: s.model_dump() for d, s in report.exact_match(stage).items()},
        "forgetting": forgetting,
    }


def record_evaluation(
    client: MlflowClient, params: Params, layout: Layout, run_id: str, report: EvalReport
) -> dict[str, str]:
    """Put each evaluated model's scores on its version (found by stage and content hash) and point
    `candidate` at the version the promotion rule picks; returns {stage: version}."""
    name = registered_model_name(params)
    updated: dict[str, str] = {}
    for stage, model in report.models.items():
        content = model.content_hash or (read_lineage(layout.model(stage)) or {}).get("content_hash")
        version = find_version(client, name, stage, content)
        if version is None:
            log.warning(
                "evaluate: no version of %s holds %s at content %s; scores not attached", name, stage, str(content)[:12]
            )
            continue
        record = _eval_record(report, stage, run_id)
        tags = {EVAL_TAG: json.dumps(record, sort_keys=True), TAG + "eval_engine": record["engine"]}
        for domain, score in report.exact_match(stage).items():
            interval = (
                f" [{score.ci_low:.4f}, {score.ci_high:.4f}]"
                if score.ci_low is not None and score.ci_high is not None
                else ""
            )
            tags[f"{EVAL_TAG}.{domain}.exact_match"] = f"{score.mean:.4f}{interval} n={score.n}"
        for domain, value in record["forgetting"].items():
            tags[f"{EVAL_TAG}.{domain}.forgetting"] = f"{value:.4f}"
        _set_tags(client, name, _ver(version), tags)
        _set_description(client, name, _ver(version))
        card = modelcard.build_model_card(
            name, _ver(version), retry_locked(client.get_model_version, name, _ver(version)).tags
        )
        retry_locked(client.log_text, run_id, card, f"model_cards/{name}-v{_ver(version)}-{stage}.md")
        updated[stage] = _ver(version)
    stage, _ = candidate_stage(params.promotion, report)
    if stage in updated:
        _set_alias(client, name, CANDIDATE, updated[stage])
    return updated


def _downloaded_report(client: MlflowClient, run_id: str) -> EvalReport | None:
    """The eval.json the evaluate run `run_id` logged (None when it has none)."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = retry_locked(client.download_artifacts, run_id, "metrics/eval.json", folder)
        except (MlflowException, OSError):
            return None
        return EvalReport.parse(json.loads(Path(path).read_text()), f"eval.json of run {run_id}")


def version_report(client: MlflowClient, layout: Layout, version: ModelVersion) -> EvalReport | None:
    """The evaluation of `version`: the workspace's eval.json when it holds the version's content, else the
    report of the evaluate run whose scores the version carries; None when it was never evaluated."""
    stage, content = version.tags.get(STAGE_TAG), version.tags.get(CONTENT_TAG)
    local = workspace_report(layout)
    if local is not None and stage in local.models and local.models[stage].content_hash == content:
        return local
    record = _scores(version)
    if record is None or not record.get("run_id"):
        return None
    return _downloaded_report(client, record["run_id"])


# --------------------------------------------------------------------------- promotion


@dataclass
class PromotionResult:
    """What `promote` or `rollback` decided. `changed` is False when the registry was left as it was."""

    name: str
    version: str | None
    champion_before: str | None
    champion_after: str | None
    promoted: bool
    changed: bool
    forced: bool = False
    reason: str = ""
    checks: list[Check] = field(default_factory=list)
    status: str = ""  # promote | refuse | inconclusive | unchanged | rolled-back

    def summary(self) -> str:
        marks = {"pass": "pass", "fail": "FAIL", "inconclusive": "????"}
        lines = [f"{self.name}: {self.reason}"]
        lines += [f"  [{marks[g.status]}] {g.name}: {g.detail}" for g in self.checks]
        return "\n".join(lines)


def _scores(version: ModelVersion | None) -> dict[str, Any] | None:
    if version is None or not version.tags.get(EVAL_TAG):
        return None
    return json.loads(version.tags[EVAL_TAG])


def _history(client: MlflowClient, name: str) -> list[str]:
    model = retry_locked(client.get_registered_model, name)
    try:
        return [str(v) for v in json.loads(model.tags.get(HISTORY_TAG, "[]"))]
    except json.JSONDecodeError:
        return []


def _set_history(client: MlflowClient, name: str, history: list[str]) -> None:
    retry_locked(client.set_registered_model_tag, name, HISTORY_TAG, json.dumps(history[-50:]))


def _move_champion(client: MlflowClient, name: str, version: str, before: ModelVersion | None) -> None:
    if before is not None:
        _set_alias(client, name, PREVIOUS, _ver(before))
    _set_alias(client, name, CHAMPION, version)
    history = _history(client, name)
    if before is not None and (not history or history[-1] != _ver(before)):
        history.append(_ver(before))  # a champion set outside this module
    _set_history(client, name, [*history, version])


def _get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return retry_locked(client.get_model_version, name, version)
    except MlflowException:
        known = [_ver(v) for v in _versions(client, name)]
        raise PromotionError(f"--version {version}: '{name}' has no such version; it has versions {known}") from None


def workspace_candidate(client: MlflowClient, params: Params, layout: Layout, stage: str) -> ModelVersion:
    """The registered version holding the workspace's `stage` model (DVC's run cache can restore an older
    output without running the stage: the workspace's lineage.json says which model is really there)."""
    name = registered_model_name(params)
    model_dir = layout.model(stage)
    lineage = read_lineage(model_dir)
    if lineage is None:
        raise PromotionError(
            f"{model_dir}: no model with lineage.json in the workspace; run the '{stage}' stage "
            "or name a version with --version"
        )
    content = lineage.get("content_hash") or content_hash(file_hashes(model_dir))
    found = find_version(client, name, stage, content)
    if found is None:
        raise PromotionError(
            f"the workspace model {model_dir} ('{stage}', content {content[:12]}) is not a version of '{name}'; "
            f"register it by rerunning the stage (dvc repro --force {stage}), or name a version with --version"
        )
    return found


@contextlib.contextmanager
def promotion_lock(client: MlflowClient, name: str, wait_seconds: float = 60.0) -> Iterator[None]:
    """Serialise promotions of `name` across machines: the lock is a registered model `<name>.promotion-lock`,
    which the tracking store creates at most once (its name is unique), deleted on release."""
    from mlflow.exceptions import MlflowException

    lock = name + LOCK_SUFFIX
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    deadline = time.monotonic() + wait_seconds
    announced = False
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": holder, "since": str(time.time())})
            break
        except MlflowException:
            try:
                current = client.get_registered_model(lock)
            except MlflowException:  # released meanwhile (or the store is busy): try again shortly
                if time.monotonic() >= deadline:
                    raise PromotionError(
                        f"could not take the promotion lock of '{name}' in {wait_seconds:.0f} s"
                    ) from None
                time.sleep(0.2)
                continue
            since = float(current.tags.get("since", "0") or 0)
            if time.time() - since > LOCK_STALE_SECONDS:
                log.warning("%s: breaking a promotion lock held since %.0f s by %s", name, time.time() - since,
                            current.tags.get("holder"))  # fmt: skip
                with contextlib.suppress(MlflowException):
                    client.delete_registered_model(lock)
                continue
            if time.monotonic() >= deadline:
                raise PromotionError(
                    f"another promotion of '{name}' is in progress ({current.tags.get('holder', 'unknown holder')}); "
                    f"waited {wait_seconds:.0f} s. Retry when it is done"
                ) from None
            if not announced:
                print(f"{name}: waiting for another promotion ({current.tags.get('holder', 'unknown holder')})")
                announced = True
            time.sleep(0.5)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            retry_locked(client.delete_registered_model, lock)


def promote(
    params: Params,
    root: Path,
    version: str | None = None,
    force: bool = False,
    reason: str | None = None,
    wait_seconds: float = 60.0,
) -> PromotionResult:
    """Promote the candidate (`promotion.candidate` in the workspace, or `version`) to `champion` if the rules
    of posttrain.tracking.rules pass; `force` skips them and needs a `reason`, which is recorded. Prints the
    decision and every check."""
    if force and not (reason and reason.strip()):
        raise PromotionError("promote --force needs a reason (recorded on the version); e.g. --reason 'hotfix for ...'")
    client = connect(params, Path(root))
    layout = Layout(Path(root))
    name = registered_model_name(params)
    _check_not_legacy(client, params)
    if not _exists(client, name):
        raise PromotionError(f"registered model '{name}' does not exist; run the pipeline (its stages register models)")
    if version is None:
        stage, chosen_by = candidate_stage(params.promotion, workspace_report(layout))
        print(f"candidate: '{stage}' (chosen by {chosen_by})")
        target = workspace_candidate(client, params, layout, stage)
        _set_alias(client, name, CANDIDATE, _ver(target))
    else:
        target = _get_version(client, name, str(version))
        stage = target.tags.get(STAGE_TAG) or "unknown"
        print(f"candidate: version {version} ('{stage}', named by --version)")
    seen = _alias(client, name, CHAMPION)  # the champion this decision is about to replace
    with promotion_lock(client, name, wait_seconds):
        now = _alias(client, name, CHAMPION)
        if (_ver(now) if now else None) != (_ver(seen) if seen else None) and (
            now is None or _ver(now) != _ver(target)
        ):
            # Another promotion moved `champion` while this one waited: a decision taken against the old
            # champion is not applied (the last writer would silently win); judged again, it may still pass.
            raise PromotionError(
                f"another promotion made version {_ver(now) if now else 'none'} the champion of '{name}' while this one "
                f"waited for the lock (it was {_ver(seen) if seen else 'unset'}); version {_ver(target)} was not "
                "promoted. Run `posttrain promote` again to judge it against the new champion"
            )
        return _promote_locked(client, params, layout, name, target, stage, force, reason)


def _promote_locked(
    client: MlflowClient,
    params: Params,
    layout: Layout,
    name: str,
    target: ModelVersion,
    stage: str,
    force: bool,
    reason: str | None,
) -> PromotionResult:
    champion = _alias(client, name, CHAMPION)  # read under the lock: another promotion may just have moved it
    before = _ver(champion) if champion else None
    if champion is not None and _ver(champion) == _ver(target):
        result = PromotionResult(name, before, before, before, promoted=True, changed=False, status="unchanged",
                                 reason=f"version {before} ('{stage}') is already the champion; nothing to do")  # fmt: skip
        print(result.summary())
        return result
    report = version_report(client, layout, target)
    if report is None:
        checks = [Check("evaluated", "fail", f"version {_ver(target)} ('{stage}') has no evaluation; run evaluate "
                      "with its model in the workspace (evaluate.models)")]  # fmt: skip
    else:
        spread, seed_std = _seed_terms(params, layout, stage)
        served = None
        if champion is not None:
            served = Champion(
                _ver(champion), champion.tags.get(STAGE_TAG) or "unknown", version_report(client, layout, champion)
            )
        checks = checks_for(params.promotion, report, stage, served, spread, seed_std)
    if target.tags.get(ROLLED_BACK_TAG) == "true":
        checks.append(Check("not_rolled_back", "fail", f"version {_ver(target)} was rolled back; promote it again only "
                          "with --force and a reason"))  # fmt: skip
    verdict = decide(checks, params.promotion)
    check_record = json.dumps([asdict(g) for g in checks], sort_keys=True)
    if verdict.promote or force:
        forced = force and not verdict.promote
        why = reason.strip() if force and reason else "passed all checks"
        tags = {
            TAG + "promotion.status": "champion",
            TAG + "promotion.reason": why,
            TAG + "promotion.forced": "true" if forced else "false",
            TAG + "promotion.checks": check_record,
        }
        if before:
            tags[TAG + "promotion.previous_champion"] = before
        _set_tags(client, name, _ver(target), tags)
        if champion is not None:
            _set_tags(client, name, _ver(champion), {TAG + "promotion.status": f"replaced by version {_ver(target)}"})
            _set_description(client, name, _ver(champion))
        _move_champion(client, name, _ver(target), champion)
        _set_description(client, name, _ver(target))
        result = PromotionResult(
            name, _ver(target), before, _ver(target), promoted=True, changed=True, forced=forced, checks=checks,
            status="promote",
            reason=f"version {_ver(target)} ('{stage}') is now the champion"
            + (f" (FORCED past {verdict.status} checks: {why})" if forced else f" ({why})")
            + (f"; version {before} is previous-champion" if before else ""),
        )  # fmt: skip
    else:
        word = "INCONCLUSIVE" if verdict.status == "inconclusive" else "REFUSED"
        changed = _set_tags(
            client,
            name,
            _ver(target),
            {
                TAG + "promotion.status": "inconclusive" if verdict.status == "inconclusive" else "refused",
                TAG + "promotion.reason": verdict.reasons(),
                TAG + "promotion.checks": check_record,
            },
        )
        if changed:
            _set_description(client, name, _ver(target))
        result = PromotionResult(
            name, _ver(target), before, before, promoted=False, changed=changed, checks=checks, status=verdict.status,
            reason=f"version {_ver(target)} ('{stage}') NOT promoted, {word} (champion stays {before or 'unset'}): "
            + verdict.reasons(),
        )  # fmt: skip
    print(result.summary())
    return result


def _seed_terms(params: Params, layout: Layout, stage: str) -> tuple[Any, float | None]:
    """(seed spread of a difference, seed std of the candidate on compare_domain) from seeds.json, when
    `promotion.seed_spread` asks the rules to judge the recipe rather than this run's models alone."""
    summary = seeds.current_summary(layout.root) if params.promotion.seed_spread else None
    if summary is None:
        return None, None
    domain = params.promotion.compare_domain
    return (
        lambda c, a, d: seeds.difference_spread(summary, c, a, d),
        seeds.spread(summary, stage, domain) if domain else None,
    )


def promotion_verdict(params: Params, root: Path) -> PromotionResult:
    """The end of `posttrain run`: `promote` when tracking is on; otherwise the same rules on the workspace's
    eval.json (no champion to compare with), printed, nothing changed."""
    if params.tracking.enabled:
        return promote(params, root)
    layout = Layout(Path(root))
    report = workspace_report(layout)
    stage, chosen_by = candidate_stage(params.promotion, report)
    print(f"candidate: '{stage}' (chosen by {chosen_by})")
    if report is None:
        checks = [Check("evaluated", "fail", f"{layout.metrics('eval')} does not exist; run the evaluate stage first")]
    else:
        spread, _ = _seed_terms(params, layout, stage)
        checks = checks_for(params.promotion, report, stage, None, spread)
    verdict: Verdict = decide(checks, params.promotion)
    shown = {"promote": "passes every check", "refuse": "REFUSED", "inconclusive": "INCONCLUSIVE"}[verdict.status]
    result = PromotionResult(
        stage, None, None, None, promoted=verdict.promote, changed=False, checks=checks, status=verdict.status,
        reason=f"{shown}{': ' + verdict.reasons() if not verdict.promote else ''} (tracking.enabled is false: the "
        "registry is not touched; `posttrain promote` needs tracking on)",
    )  # fmt: skip
    print(result.summary())
    return result


def rollback(params: Params, root: Path, wait_seconds: float = 60.0) -> PromotionResult:
    """Make the previous champion of the recipe's model the champion again; the demoted version is tagged rolled-back."""
    client = connect(params, Path(root))
    _check_not_legacy(client, params)
    name = registered_model_name(params)
    if not _exists(client, name):
        raise PromotionError(f"registered model '{name}' does not exist; nothing to roll back")
    with promotion_lock(client, name, wait_seconds):
        champion = _alias(client, name, CHAMPION)
        history = _history(client, name)
        if champion is not None and history and history[-1] == _ver(champion):
            history.pop()
        if history:
            previous: str | None = history[-1]
        else:  # no history tag (aliases set by hand): fall back on the alias
            alias = _alias(client, name, PREVIOUS)
            previous = _ver(alias) if alias else None
        if previous is None or champion is None:
            raise PromotionError(
                f"'{name}' has no previous champion to roll back to (champion: {_ver(champion) if champion else 'unset'})"
            )
        _set_alias(client, name, CHAMPION, previous)
        _set_tags(
            client,
            name,
            _ver(champion),
            {
                TAG + "promotion.status": "rolled-back",
                ROLLED_BACK_TAG: "true",
                TAG + "promotion.reason": f"rolled back to version {previous}",
            },
        )
        _set_tags(client, name, previous, {TAG + "promotion.status": "champion"})
        if len(history) >= 2:
            _set_alias(client, name, PREVIOUS, history[-2])
        elif _alias(client, name, PREVIOUS) is not None:
            retry_locked(client.delete_registered_model_alias, name, PREVIOUS)
        _set_history(client, name, history)
        for v in (_ver(champion), previous):
            _set_description(client, name, v)
    stages = {
        v: retry_locked(client.get_model_version, name, v).tags.get(STAGE_TAG) for v in (previous, _ver(champion))
    }
    result = PromotionResult(
        name, previous, _ver(champion), previous, promoted=True, changed=True, status="rolled-back",
        reason=f"rolled back: version {previous} ('{stages[previous]}') is the champion again "
        f"(version {_ver(champion)} ('{stages[_ver(champion)]}') demoted)",
    )  # fmt: skip
    print(result.summary())
    return result


# --------------------------------------------------------------------------- showing and migrating


def show(params: Params, root: Path, echo: bool = True) -> dict[str, Any]:
    """The recipe's model as a dict ({tracking_uri, name, aliases, versions}); printed as a table."""
    client = connect(params, Path(root))
    name = registered_model_name(params)
    state: dict[str, Any] = {"tracking_uri": redact(client.tracking_uri), "name": name, "aliases": {}, "versions": []}
    legacy = legacy_models(client, params)
    if legacy and not (
        _exists(client, name) and retry_locked(client.get_registered_model, name).tags.get(MIGRATED_TAG)
    ):
        state["legacy_models"] = legacy
    if _exists(client, name):
        model = retry_locked(client.get_registered_model, name)
        state["aliases"] = {alias: str(v) for alias, v in (model.aliases or {}).items()}
        for v in _versions(client, name):
            scores = _scores(v) or {}
            state["versions"].append(
                {
                    "version": _ver(v),
                    "stage": v.tags.get(STAGE_TAG, ""),
                    "aliases": sorted(a for a, n in state["aliases"].items() if n == _ver(v)),
                    "content_hash": v.tags.get(CONTENT_TAG, "")[:12],
                    "status": v.tags.get(TAG + "promotion.status", ""),
                    "reason": v.tags.get(TAG + "promotion.reason", ""),
                    "exact_match": {d: s["mean"] for d, s in (scores.get("exact_match") or {}).items()},
                    "run_id": v.run_id,
                }
            )
    if echo:
        print(
            f"MLflow registry at {state['tracking_uri']}: registered model '{name}' (serve models:/{name}@{CHAMPION})"
        )
        if state.get("legacy_models"):
            print(
                f"  per-stage models of an older posttrain: {state['legacy_models']}; run `posttrain registry --migrate`"
            )
        print(f"  aliases: {state['aliases'] or 'none'}")
        for v in state["versions"]:
            scores = " ".join(f"{d}={m:.3f}" for d, m in sorted(v["exact_match"].items()))
            print(
                f"  v{v['version']:<4} {v['stage']:<12} {','.join(v['aliases']) or '-':<28} {v['content_hash']:<12} "
                f"{v['status'] or '-':<12} {scores}"
            )
    return state


def migrate(params: Params, root: Path) -> dict[str, Any]:
    """Copy the versions of an older store's per-stage models (`<prefix>-<stage>`) into the recipe's model.

    Each old version becomes a new version with the same source, run and tags (plus `posttrain.migrated_from`
    `<old name>/<version>` and its old aliases in `posttrain.migrated_aliases`). The champion of the model the
    older posttrain served (`<prefix>-<promotion.final_stage>`), if any, becomes the champion, with the
    previous champions of its history. The old models stay as they were: nothing is deleted.
    """
    client = connect(params, Path(root))
    name = registered_model_name(params)
    old_models = legacy_models(client, params)
    if not old_models:
        raise PromotionError(
            f"no per-stage registered models '{name}-<stage>' in {redact(client.tracking_uri)}; nothing to migrate"
        )
    if _exists(client, name) and retry_locked(client.get_registered_model, name).tags.get(MIGRATED_TAG):
        raise PromotionError(
            f"'{name}' was migrated already ({retry_locked(client.get_registered_model, name).tags[MIGRATED_TAG]})"
        )
    if not _exists(client, name):
        retry_locked(client.create_registered_model, name, description=f"posttrain recipe '{name}'")
    mapping: dict[str, str] = {}  # '<old name>/<version>' -> new version
    for old in old_models:
        aliases_of: dict[str, list[str]] = {}
        for alias, number in (retry_locked(client.get_registered_model, old).aliases or {}).items():
            aliases_of.setdefault(str(number), []).append(alias)
        for v in _versions(client, old):
            tags = dict(v.tags)
            tags.setdefault(STAGE_TAG, old[len(name) + 1 :])
            tags[MIGRATED_TAG] = f"{old}/{_ver(v)}"
            if aliases_of.get(_ver(v)):
                tags[TAG + "migrated_aliases"] = ",".join(sorted(aliases_of[_ver(v)]))
            new = retry_locked(client.create_model_version, name=name, source=v.source, run_id=v.run_id, tags=tags)
            mapping[f"{old}/{_ver(v)}"] = _ver(new)
    served = f"{name}-{params.promotion.final_stage}"
    champion = _alias(client, served, CHAMPION) if served in old_models else None
    if champion is not None:
        history = [mapping[f"{served}/{v}"] for v in _history(client, served) if f"{served}/{v}" in mapping]
        _set_alias(client, name, CHAMPION, mapping[f"{served}/{_ver(champion)}"])
        if len(history) >= 2:
            _set_alias(client, name, PREVIOUS, history[-2])
        _set_history(client, name, history or [mapping[f"{served}/{_ver(champion)}"]])
    note = f"{', '.join(old_models)} (migrated {time.strftime('%Y-%m-%d %H:%M:%S')})"
    retry_locked(client.set_registered_model_tag, name, MIGRATED_TAG, note)
    result = {
        "name": name,
        "from": old_models,
        "versions": mapping,
        "champion": mapping.get(f"{served}/{_ver(champion)}") if champion else None,
    }
    print(f"{name}: {len(mapping)} version(s) copied from {', '.join(old_models)} (kept as they were)")
    if champion is not None:
        print(f"{name}: champion = version {result['champion']} (was {served} version {_ver(champion)})")
    else:
        print(f"{name}: no champion set ({served} had none); promote one with `posttrain promote --version N`")
    return result
