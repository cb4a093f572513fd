"""Model registry: a version per model-producing stage, evaluation scores on versions, gated promotion.

Registered model `<tracking.registered_model_prefix>-<stage>` gets a new version each time its stage
writes a model folder with new content (same content hash = same version, so a forced rerun of an
identical stage does not pile up duplicates). Versions carry lineage and, once `evaluate` ran, their
scores as tags. Aliases on the final stage's model (`promotion.final_stage`):

- `candidate`: the newest version of the final stage;
- `champion`: the promoted model (`models:/<name>@champion` is what users load);
- `previous-champion`: the champion before the current one (what `rollback` restores).

Promotion rule (documented in the README's promotion section, written here once):
1. the candidate must have evaluation scores;
2. `promotion.min_exact_match[domain]`: the candidate's mean exact match >= the threshold;
3. `promotion.max_forgetting[domain]`: the candidate's forgetting on the domain <= the threshold;
4. `promotion.compare_domain` (when a champion exists): the lower end of the confidence interval of
   the improvement d = candidate - champion must exceed `promotion.min_improvement`:
       d_low = (mean_c - mean_p) - sqrt((mean_c - ci_low_c)^2 + (ci_high_p - mean_p)^2)
   i.e. the two intervals' relevant half-widths combined in quadrature (independent samples; a
   bootstrap CI may be asymmetric, so each side uses its own half). With min_improvement 0 the
   candidate must be better beyond noise; a negative value is a non-inferiority margin.
5. where `artifacts/metrics/seeds.json` exists (`posttrain seeds N`), the improvement d must also
   exceed the seed standard deviation of the candidate stage on `compare_domain`: beyond training noise,
   not only beyond one run's sampling noise.
5. the lineage gate (`posttrain.tracking.gate`): not worse, beyond the confidence intervals (and the
   seed spread when given), than any evaluated model the candidate descends from, on any gated domain.
The candidate is `promotion.candidate` (a named stage or the best of several on a metric; see
`posttrain.tracking.gate`), by default the final stage; its version is the one whose content matches
the workspace's model, and the champion it is compared with is the champion of that stage's model.
A refused candidate keeps its aliases; the reasons are tagged on the version and printed. A version
that was rolled back is not promoted again without `force`.

`import mlflow` stays inside functions: the CLI imports this module lazily, but cheaply.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import MODEL_STAGES, Params
from posttrain.errors import PromotionError
from posttrain.io import json_hash, redact
from posttrain.layout import Layout
from posttrain.lineage import content_hash, file_hashes, library_versions, read_lineage
from posttrain.scoring import seeds
from posttrain.tracking import modelcard
from posttrain.tracking.client import TAG, connect, lineage_tags, retry_locked
from posttrain.tracking.gate import Gate, candidate_stage, lineage_gates, read_eval

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger("posttrain.tracking.registry")

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous-champion"
EVAL_TAG = TAG + "eval"
HISTORY_TAG = TAG + "champion_history"
ROLLED_BACK_TAG = TAG + "rolled_back"  # kept when the status tag changes later


def _ver(model_version: Any) -> str:
    """A version number as a string (MLflow returns ints here and strings there)."""
    return str(model_version.version)


def registered_model_name(params: Params, stage: str) -> str:
    return f"{params.tracking.registered_model_prefix}-{stage.split('@')[0]}"


# --------------------------------------------------------------------------- versions


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    # lazy: mlflow takes seconds to import; only tracking calls need it (the CLI imports this module for --help)
    from mlflow.exceptions import MlflowException

    try:
        retry_locked(client.get_registered_model, name)
    except MlflowException:
        try:
            retry_locked(client.create_registered_model, name)
        except MlflowException:  # created by a parallel stage meanwhile
            retry_locked(client.get_registered_model, name)


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    quoted = name.replace("'", "\\'")
    versions = retry_locked(client.search_model_versions, f"name = '{quoted}'", max_results=1000)
    return sorted(versions, key=lambda v: int(_ver(v)))


def find_version(client: MlflowClient, name: str, content: str | None) -> ModelVersion | None:
    """The newest version of `name` whose model content hash is `content`."""
    if not content:
        return None
    matches = [v for v in _versions(client, name) if v.tags.get(TAG + "content_hash") == content]
    return matches[-1] if matches else None


def parent_versions(client: MlflowClient, params: Params, lineage: dict[str, Any]) -> list[str]:
    """'<name>/<version>' of each parent model in `lineage` that is in the registry."""
    found = []
    for parent in lineage.get("parents") or []:
        if not parent.get("stage"):
            continue
        name = registered_model_name(params, parent["stage"])
        version = find_version(client, name, parent.get("content_hash")) if _exists(client, name) else None
        found.append(f"{name}/{_ver(version)}" if version else f"{parent['stage']} (not registered)")
    return found


def _exists(client: MlflowClient, name: str) -> bool:
    # lazy: mlflow takes seconds to import; only tracking calls need it (the CLI imports this module for --help)
    from mlflow.exceptions import MlflowException

    try:
        retry_locked(client.get_registered_model, name)
        return True
    except MlflowException:
        return False


def _stage_chain(client: MlflowClient, params: Params, stage: str, lineage: dict[str, Any]) -> str:
    """'pretrain > cpt > sft' through the parents' versions; merges show their inputs in brackets."""
    chains = []
    for parent in lineage.get("parents") or []:
        name = registered_model_name(params, parent.get("stage") or "unknown")
        version = find_version(client, name, parent.get("content_hash")) if _exists(client, name) else None
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
    # lazy: mlflow takes seconds to import; only tracking calls need it (the CLI imports this module for --help)
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
    """Log `model_dir` with the transformers flavour under `run_id` and make it a registry version.

    Loading it back is one call: `mlflow.transformers.load_model("models:/<name>@<alias>")` returns a
    text-generation pipeline (`mlflow.pyfunc.load_model` also works; `predict` takes
    `params={"max_new_tokens": ...}`).
    """
    # lazy: mlflow, huggingface_hub, transformers are heavy to import; only this path needs them
    import mlflow
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = registered_model_name(params, stage)
    _ensure_registered_model(client, name)
    content = lineage.get("content_hash") or content_hash(file_hashes(model_dir))
    version = find_version(client, name, content)
    if version is not None:
        log.info("%s: content %s is already version %s; not registering it again", name, content[:12], _ver(version))
    else:
        tags = {**lineage_tags(lineage), TAG + "content_hash": content, TAG + "stage": stage, TAG + "run_id": run_id}
        tags[TAG + "stages"] = _stage_chain(client, params, stage, lineage)
        inputs = parent_versions(client, params, lineage)
        if inputs:
            tags[TAG + "input_models"] = ", ".join(inputs)
        trust = params.model.trust_remote_code
        components = {
            "model": AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust),
            "tokenizer": AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust),
        }
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
    if stage.split("@")[0] == params.promotion.final_stage:
        _set_alias(client, name, CANDIDATE, _ver(version))
    return retry_locked(client.get_model_version, name, _ver(version))


def load_registered_model(model_uri: str) -> Any:
    """A registered version for serving: `mlflow.transformers.load_model(model_uri)` (a text-generation
    pipeline), refused unless its tokenizer's chat template has the fingerprint the version was registered
    with (tag `posttrain.chat_template_fingerprint`, from lineage.json). A template swapped in the registry's
    copy would make the model chat in a format it was never trained on. Uses MLflow's current tracking and
    registry URIs (`mlflow.set_tracking_uri`, `MLFLOW_TRACKING_URI`)."""
    # lazy: mlflow takes seconds to import; only tracking calls need it (the CLI imports this module for --help)
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
    # lazy: mlflow takes seconds to import; only tracking calls need it (the CLI imports this module for --help)
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


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _score(node: Any) -> dict[str, Any] | None:
    """{mean, ci_low, ci_high, n} from a number, {mean|value, ci_low, ci_high, n} or {mean, ci: [lo, hi]}."""
    if _number(node) is not None:
        return {"mean": float(node), "ci_low": None, "ci_high": None, "n": None}
    if not isinstance(node, dict):
        return None
    mean = _number(node.get("mean", node.get("value", node.get("score"))))
    if mean is None:
        return None
    ci = node.get("ci") if isinstance(node.get("ci"), (list, tuple)) and len(node["ci"]) == 2 else (None, None)
    return {
        "mean": mean,
        "ci_low": _number(node.get("ci_low", ci[0])),
        "ci_high": _number(node.get("ci_high", ci[1])),
        "n": node.get("n"),
    }


def parse_eval(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model stage: {exact_match: {domain: score}, forgetting: {domain: float}, content_hash}.

    Reads docs/eval-schema.md version 1 (models.<stage>.domains.<domain>.exact_match,
    forgetting.forgetting.<stage>.<domain>.value, models.<stage>.content_hash). Tolerant of the shapes eval.json may take (docs/eval-schema.md): models under `models`,
    `scores` or `results` (a mapping or a list of {model|stage|name, ...}) or at the top level;
    domains under `domains`, `scores`, `exact_match` or directly; forgetting per model or as a
    top-level mapping {model: {domain: x}}, {domain: {model: x}} or a matrix {models, domains, values}.
    """
    node = next((data[key] for key in ("models", "scores", "results") if isinstance(data.get(key), (dict, list))), None)
    if isinstance(node, list):
        node = {str(m.get("model") or m.get("stage") or m.get("name")): m for m in node if isinstance(m, dict)}
    if node is None:
        node = {key: value for key, value in data.items() if key in MODEL_STAGES and isinstance(value, dict)}
    parsed: dict[str, dict[str, Any]] = {}
    for model, entry in node.items():
        if not isinstance(entry, dict):
            continue
        domains = next(
            (entry[key] for key in ("domains", "scores", "exact_match") if isinstance(entry.get(key), dict)), entry
        )
        exact = {}
        for domain, value in domains.items():
            if domain in ("forgetting", "content_hash", "pass_at_k", "model", "stage", "path"):
                continue
            score = _score(value.get("exact_match") if isinstance(value, dict) and "exact_match" in value else value)
            if score is not None:
                exact[domain] = score
        forgetting = {
            d: v
            for d, v in (
                (d, _number(_score(x)["mean"] if _score(x) else None))
                for d, x in (entry.get("forgetting") or {}).items()
            )
            if v is not None
        }
        parsed[model] = {
            "exact_match": exact,
            "forgetting": forgetting,
            "content_hash": entry.get("content_hash") or entry.get("model_content_hash"),
        }
    top = data.get("forgetting")
    if isinstance(top, dict) and isinstance(top.get("forgetting"), dict):
        top = top["forgetting"]  # schema v1: {metric, scores, forgetting: {stage: {domain: {value, ...}}}, worst}
    if isinstance(top, dict):
        rows = top.get("models") or top.get("rows")
        cols = top.get("domains") or top.get("columns")
        values = top.get("values") or top.get("matrix")
        if isinstance(rows, list) and isinstance(cols, list) and isinstance(values, list):
            top = {
                m: dict(zip(cols, row, strict=False))
                for m, row in zip(rows, values, strict=False)
                if isinstance(row, list)
            }
        elif (
            top
            and all(isinstance(v, dict) for v in top.values())
            and not set(top) & set(parsed)
            and set().union(*top.values()) & set(parsed)
        ):
            top = {m: {d: row[m] for d, row in top.items() if m in row} for m in parsed}  # {domain: {model: x}}
        for model, per_domain in top.items():
            if model in parsed and isinstance(per_domain, dict):
                for domain, value in per_domain.items():
                    number = (
                        _number(value) if not isinstance(value, dict) else _number((_score(value) or {}).get("mean"))
                    )
                    if number is not None and not math.isnan(number):
                        parsed[model]["forgetting"].setdefault(domain, number)
    return parsed


def record_evaluation(
    client: MlflowClient, params: Params, layout: Layout, run_id: str, data: dict[str, Any]
) -> dict[str, str]:
    """Put each evaluated model's scores on its registry version (found by content hash); returns
    {stage: version}. Promotion reads scores from these tags, not from files."""
    updated: dict[str, str] = {}
    prepared = json_hash(layout.prepared / "manifest.json")
    confidence = data.get("confidence") or (data.get("config") or {}).get("confidence") or params.evaluate.confidence
    for stage, scores in parse_eval(data).items():
        name = registered_model_name(params, stage)
        content = scores["content_hash"] or (read_lineage(layout.model(stage)) or {}).get("content_hash")
        version = find_version(client, name, content) if _exists(client, name) else None
        if version is None:
            log.warning(
                "evaluate: no registry version of %s with content %s; scores not attached", name, str(content)[:12]
            )
            continue
        record = {
            "exact_match": scores["exact_match"],
            "forgetting": scores["forgetting"],
            "confidence": confidence,
            "run_id": run_id,
            "prepared_manifest_hash": prepared,
        }
        tags = {EVAL_TAG: json.dumps(record, sort_keys=True)}
        for domain, score in scores["exact_match"].items():
            interval = (
                f" [{score['ci_low']:.4f}, {score['ci_high']:.4f}]"
                if score["ci_low"] is not None and score["ci_high"] is not None
                else ""
            )
            tags[f"{EVAL_TAG}.{domain}.exact_match"] = f"{score['mean']:.4f}{interval} n={score['n']}"
        for domain, value in scores["forgetting"].items():
            tags[f"{EVAL_TAG}.{domain}.forgetting"] = f"{value:.4f}"
        _set_tags(client, name, _ver(version), tags)
        _set_description(client, name, _ver(version))
        card = modelcard.build_model_card(
            name, _ver(version), retry_locked(client.get_model_version, name, _ver(version)).tags
        )
        retry_locked(client.log_text, run_id, card, f"model_cards/{name}-v{_ver(version)}.md")
        updated[stage] = _ver(version)
    return updated


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
    gates: list[Gate] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.name}: {self.reason}"]
        lines += [f"  [{'pass' if g.passed else 'FAIL'}] {g.name}: {g.detail}" for g in self.gates]
        return "\n".join(lines)


def _scores(version: ModelVersion | None) -> dict[str, Any] | None:
    if version is None or not version.tags.get(EVAL_TAG):
        return None
    return json.loads(version.tags[EVAL_TAG])


def check_gates(
    params: Params,
    candidate: dict[str, Any] | None,
    champion: dict[str, Any] | None,
    champion_version: str | None = None,
    seed_std: float | None = None,
) -> list[Gate]:
    """The promotion rule of this module's docstring, as a list of named pass/fail checks.

    `seed_std`: the seed standard deviation of the final stage on `compare_domain` from seeds.json
    (`posttrain seeds N`); when given, the improvement must also exceed it (rule 5).
    """
    rules = params.promotion
    if candidate is None:
        return [Gate("evaluated", False, "the candidate has no evaluation scores; run the evaluate stage first")]
    gates = [Gate("evaluated", True, f"scores from run {candidate.get('run_id')}")]
    exact, forgetting = candidate.get("exact_match", {}), candidate.get("forgetting", {})
    for domain, threshold in sorted(rules.min_exact_match.items()):
        score = exact.get(domain)
        if score is None:
            gates.append(Gate(f"min_exact_match.{domain}", False, f"no exact-match score for domain '{domain}'"))
        else:
            gates.append(
                Gate(
                    f"min_exact_match.{domain}",
                    score["mean"] >= threshold,
                    f"{score['mean']:.4f} (needs >= {threshold})",
                )
            )
    for domain, threshold in sorted(rules.max_forgetting.items()):
        value = forgetting.get(domain)
        if value is None:
            gates.append(Gate(f"max_forgetting.{domain}", False, f"no forgetting score for domain '{domain}'"))
        else:
            gates.append(Gate(f"max_forgetting.{domain}", value <= threshold, f"{value:.4f} (needs <= {threshold})"))
    domain = rules.compare_domain
    if domain:
        name = f"beats_champion.{domain}"
        if champion_version is None:
            gates.append(Gate(name, True, "no champion yet"))
        elif champion is None or domain not in champion.get("exact_match", {}):
            gates.append(Gate(name, False, f"champion v{champion_version} has no '{domain}' score to compare with"))
        elif domain not in exact:
            gates.append(Gate(name, False, f"candidate has no '{domain}' score"))
        else:
            c, p = exact[domain], champion["exact_match"][domain]
            # A missing interval counts as zero width (a point estimate): stricter data gives a fairer test.
            half_c = c["mean"] - c["ci_low"] if c["ci_low"] is not None else 0.0
            half_p = p["ci_high"] - p["mean"] if p["ci_high"] is not None else 0.0
            low = (c["mean"] - p["mean"]) - math.sqrt(half_c**2 + half_p**2)
            detail = (
                f"candidate {c['mean']:.4f} vs champion v{champion_version} {p['mean']:.4f}: improvement "
                f"{c['mean'] - p['mean']:+.4f}, CI lower end {low:+.4f} (needs > {rules.min_improvement})"
            )
            if candidate.get("prepared_manifest_hash") != champion.get("prepared_manifest_hash"):
                detail += "; note: the two were evaluated on different prepared data"
            passed = low > rules.min_improvement
            if seed_std is not None:
                # One run's bootstrap CI ignores training noise: a new seed alone moves a score this much.
                passed = passed and c["mean"] - p["mean"] > seed_std
                detail += f"; seed std {seed_std:.4f} from seeds.json (improvement must exceed it)"
            gates.append(Gate(name, passed, detail))
    return gates


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
    # lazy: mlflow takes seconds to import; only tracking calls need it (the CLI imports this module for --help)
    from mlflow.exceptions import MlflowException

    try:
        return retry_locked(client.get_model_version, name, version)
    except MlflowException:
        known = [_ver(v) for v in _versions(client, name)]
        raise PromotionError(f"--version {version}: '{name}' has no such version; it has versions {known}") from None


def workspace_candidate(client: MlflowClient, params: Params, root: Path, stage: str) -> ModelVersion:
    """The registered version holding `stage`'s model that is in the workspace now.

    DVC's run cache can restore an older output without running the stage, so nothing re-points
    the `candidate` alias; the workspace's lineage.json content hash says which model is really
    there. The alias is moved to that version (or promotion refused when it was never registered).
    """
    name = registered_model_name(params, stage)
    model_dir = Layout(root).model(stage)
    lineage = read_lineage(model_dir)
    if lineage is None:
        raise PromotionError(
            f"{model_dir}: no model with lineage.json in the workspace; run the '{stage}' stage (dvc repro {stage}) "
            "or name a version with --version"
        )
    content = lineage.get("content_hash") or content_hash(file_hashes(model_dir))
    alias = _alias(client, name, CANDIDATE)
    found = find_version(client, name, content)
    if found is None:
        held = f"version {_ver(alias)} (content {str(alias.tags.get(TAG + 'content_hash'))[:12]})" if alias else "none"
        raise PromotionError(
            f"the workspace model {model_dir} (content {content[:12]}) is not a registered version of '{name}' "
            f"('{CANDIDATE}' is {held}); register it with `dvc repro --force {stage}`, or name a version with --version"
        )
    if alias is None or _ver(alias) != _ver(found):
        was = f"version {_ver(alias)}" if alias else "unset"
        print(
            f"{name}: '{CANDIDATE}' was {was}, but the workspace model {model_dir} (content {content[:12]}) is "
            f"version {_ver(found)}; '{CANDIDATE}' now points at version {_ver(found)}"
        )
        _set_alias(client, name, CANDIDATE, _ver(found))
    return found


def promote(
    params: Params,
    root: Path,
    version: str | None = None,
    force: bool = False,
    reason: str | None = None,
    spread: dict[str, float] | None = None,
) -> PromotionResult:
    """Promote the candidate (`promotion.candidate`, or `version` of it) to `champion` if it passes
    the gates, the lineage gate included (`posttrain.tracking.gate`; `spread`: an optional seed
    standard deviation per domain); `force` skips them and needs a `reason`, which is recorded.
    Prints the decision and each comparison."""
    if force and not (reason and reason.strip()):
        raise PromotionError("promote --force needs a reason (recorded on the version); e.g. --reason 'hotfix for ...'")
    client = connect(params, Path(root))
    layout = Layout(Path(root))
    eval_data = read_eval(layout)
    stage, chosen_by = candidate_stage(params, eval_data)
    print(f"candidate: '{stage}' (chosen by {chosen_by})")
    name = registered_model_name(params, stage)
    if not _exists(client, name):
        raise PromotionError(f"registered model '{name}' does not exist; run the pipeline up to '{stage}' first")
    target = (
        _get_version(client, name, str(version)) if version else workspace_candidate(client, params, Path(root), stage)
    )
    champion = _alias(client, name, CHAMPION)
    before = _ver(champion) if champion else None
    if champion is not None and _ver(champion) == _ver(target):
        result = PromotionResult(
            name,
            _ver(target),
            before,
            before,
            promoted=True,
            changed=False,
            reason=f"version {_ver(target)} is already the champion; nothing to do",
        )
        print(result.summary())
        return result
    summary = seeds.current_summary(Path(root))
    seed_std = seeds.spread(summary, stage, params.promotion.compare_domain) if summary else None
    if spread is None and summary:
        spread = seeds.spreads(summary, stage)
    gates = check_gates(params, _scores(target), _scores(champion), before, seed_std=seed_std)
    gates += lineage_gates(params, layout, stage, eval_data, spread)
    if target.tags.get(ROLLED_BACK_TAG) == "true":
        gates.append(
            Gate(
                "not_rolled_back",
                False,
                f"version {_ver(target)} was rolled back; promote it again only with force and a reason",
            )
        )
    passed = all(g.passed for g in gates)
    gate_record = json.dumps([asdict(g) for g in gates], sort_keys=True)
    if passed or force:
        why = reason.strip() if force and reason else "passed all gates"
        tags = {
            TAG + "promotion.status": "champion",
            TAG + "promotion.reason": why,
            TAG + "promotion.forced": "true" if force and not passed else "false",
            TAG + "promotion.gates": gate_record,
        }
        if before:
            tags[TAG + "promotion.previous_champion"] = before
        _set_tags(client, name, _ver(target), tags)
        if champion is not None:
            _set_tags(client, name, _ver(champion), {TAG + "promotion.status": f"replaced by version {_ver(target)}"})
            _set_description(client, name, _ver(champion))
        _move_champion(client, name, _ver(target), champion)
        _set_description(client, name, _ver(target))
        forced = force and not passed
        result = PromotionResult(
            name,
            _ver(target),
            before,
            _ver(target),
            promoted=True,
            changed=True,
            forced=forced,
            reason=f"version {_ver(target)} is now the champion"
            + (f" (FORCED past failed gates: {why})" if forced else f" ({why})")
            + (f"; version {before} is previous-champion" if before else ""),
            gates=gates,
        )
    else:
        failed = "; ".join(f"{g.name}: {g.detail}" for g in gates if not g.passed)
        changed = _set_tags(
            client,
            name,
            _ver(target),
            {
                TAG + "promotion.status": "refused",
                TAG + "promotion.reason": failed,
                TAG + "promotion.gates": gate_record,
            },
        )
        if changed:
            _set_description(client, name, _ver(target))
        result = PromotionResult(
            name,
            _ver(target),
            before,
            before,
            promoted=False,
            changed=changed,
            reason=f"version {_ver(target)} NOT promoted (champion stays {before or 'unset'}): {failed}",
            gates=gates,
        )
    print(result.summary())
    return result


def gate_verdict(params: Params, root: Path, spread: dict[str, float] | None = None) -> PromotionResult:
    """The end of `posttrain run`: `promote` when tracking is on; otherwise the same gates on the
    workspace's eval.json and lineage files (no champion to compare with), printed, nothing changed.
    `spread`: an optional seed standard deviation per domain for the lineage gate."""
    if params.tracking.enabled:
        return promote(params, root, spread=spread)
    layout = Layout(Path(root))
    eval_data = read_eval(layout)
    stage, chosen_by = candidate_stage(params, eval_data)
    print(f"candidate: '{stage}' (chosen by {chosen_by})")
    scores = parse_eval(eval_data or {}).get(stage)
    candidate = {**scores, "run_id": "eval.json"} if scores else None
    gates = check_gates(params, candidate, None, None) + lineage_gates(params, layout, stage, eval_data, spread)
    passed = all(g.passed for g in gates)
    failed = "; ".join(f"{g.name}: {g.detail}" for g in gates if not g.passed)
    result = PromotionResult(
        stage,
        None,
        None,
        None,
        promoted=passed,
        changed=False,
        reason=("passes every gate" if passed else f"REFUSED: {failed}") + " (tracking off: no registry change)",
        gates=gates,
    )
    print(result.summary())
    return result


def rollback(params: Params, root: Path) -> PromotionResult:
    """Make the previous champion the champion again; the demoted version is tagged rolled-back."""
    client = connect(params, Path(root))
    name = registered_model_name(params, params.promotion.final_stage)
    if not _exists(client, name):
        raise PromotionError(f"registered model '{name}' does not exist; nothing to roll back")
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
    result = PromotionResult(
        name,
        previous,
        _ver(champion),
        previous,
        promoted=True,
        changed=True,
        reason=f"rolled back: version {previous} is the champion again (version {_ver(champion)} demoted)",
    )
    print(result.summary())
    return result


def show(params: Params, root: Path, echo: bool = True) -> dict[str, Any]:
    """The registry as a dict ({tracking_uri, models: [{name, aliases, versions}]}); printed as a table."""
    client = connect(params, Path(root))
    prefix = params.tracking.registered_model_prefix + "-"
    state: dict[str, Any] = {"tracking_uri": redact(client.tracking_uri), "models": []}
    models = retry_locked(client.search_registered_models, max_results=1000)
    for model in sorted(models, key=lambda m: m.name):
        if not model.name.startswith(prefix):
            continue
        aliases = {alias: str(v) for alias, v in (model.aliases or {}).items()}
        versions = []
        for v in _versions(client, model.name):
            scores = _scores(v) or {}
            versions.append(
                {
                    "version": _ver(v),
                    "aliases": sorted(a for a, n in aliases.items() if n == _ver(v)),
                    "content_hash": v.tags.get(TAG + "content_hash", "")[:12],
                    "status": v.tags.get(TAG + "promotion.status", ""),
                    "reason": v.tags.get(TAG + "promotion.reason", ""),
                    "exact_match": {d: s["mean"] for d, s in (scores.get("exact_match") or {}).items()},
                    "run_id": v.run_id,
                }
            )
        state["models"].append({"name": model.name, "aliases": aliases, "versions": versions})
    if echo:
        print(f"MLflow registry at {state['tracking_uri']}")
        for model in state["models"]:
            print(f"{model['name']}  aliases: {model['aliases'] or 'none'}")
            for v in model["versions"]:
                scores = " ".join(f"{d}={m:.3f}" for d, m in sorted(v["exact_match"].items()))
                print(
                    f"  v{v['version']:<4} {','.join(v['aliases']) or '-':<28} {v['content_hash']:<12} {v['status'] or '-':<12} {scores}"
                )
    return state
