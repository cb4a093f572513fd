"""Short Markdown model cards built from a registry version's tags.

A version's tags hold everything the card shows (lineage copied from lineage.json at registration,
scores added when `evaluate` runs, the promotion record), so the card can be rebuilt from the
version alone at each of those moments and set as the version's description.
"""

from __future__ import annotations

import json
from typing import Any

TAG = "posttrain."


def _short(value: str | None, length: int = 12) -> str:
    return f"`{value[:length]}`" if value and value != "None" else "unknown"


def _eval(tags: dict[str, str]) -> dict[str, Any]:
    try:
        return json.loads(tags.get(TAG + "eval", "") or "{}")
    except json.JSONDecodeError:
        return {}


def build_model_card(name: str, version: str | None, tags: dict[str, str]) -> str:
    """The card of `name` version `version` (None: not registered yet, e.g. the copy stored with
    the logged model) from its tags."""
    stage = tags.get(TAG + "stage", name.rsplit("-", 1)[-1])
    title = f"{name} v{version}" if version else name
    dirty = tags.get(TAG + "git_dirty")
    lines = [
        f"# {title}",
        "",
        f"Model produced by the `{stage}` stage of the posttrain pipeline.",
        "",
        "## Lineage",
        "",
        f"- Stages: {tags.get(TAG + 'stages', stage)}",
        f"- Parent models: {tags.get(TAG + 'input_models') or 'none (trained from scratch or a base model)'}",
        f"- Data manifest hash: {_short(tags.get(TAG + 'data_manifest_hash'), 16)}",
        f"- Params hash: {_short(tags.get(TAG + 'params_hash'), 16)}, seed {tags.get(TAG + 'seed', 'unknown')}",
        f"- Model content hash: {_short(tags.get(TAG + 'content_hash'), 16)}",
        f"- Chat template fingerprint: {_short(tags.get(TAG + 'chat_template_fingerprint'), 16)}",
        f"- Code: git {_short(tags.get(TAG + 'git_commit'), 10)}"
        + (" with uncommitted changes" if dirty == "True" else "" if dirty == "False" else " (dirty state unknown)"),
        f"- Created: {tags.get(TAG + 'created_at', 'unknown')}",
    ]
    libraries = sorted(
        (key[len(TAG + "version.") :], value) for key, value in tags.items() if key.startswith(TAG + "version.")
    )
    if libraries:
        lines.append("- Libraries: " + ", ".join(f"{lib} {ver}" for lib, ver in libraries))
    lines += ["", "## Evaluation", ""]
    scores = _eval(tags)
    exact = scores.get("exact_match") or {}
    if exact:
        level = scores.get("confidence")
        ci = f"{round(level * 100)}% CI" if isinstance(level, (int, float)) else "CI"
        forgetting = scores.get("forgetting") or {}
        lines += [f"| domain | exact match | {ci} | n | forgetting |", "|---|---|---|---|---|"]
        for domain, score in sorted(exact.items()):
            low, high = score.get("ci_low"), score.get("ci_high")
            interval = f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else "n/a"
            forgot = forgetting.get(domain)
            lines.append(
                f"| {domain} | {score.get('mean', float('nan')):.3f} | {interval} | {score.get('n', 'n/a')} | "
                f"{f'{forgot:.3f}' if isinstance(forgot, (int, float)) else 'n/a'} |"
            )
        lines += ["", f"Evaluated by run `{scores.get('run_id', 'unknown')}`."]
    else:
        lines.append("Not evaluated yet (the `evaluate` stage adds scores here).")
    status = tags.get(TAG + "promotion.status")
    if status:
        lines += ["", "## Promotion", "", f"- Status: {status}"]
        if tags.get(TAG + "promotion.forced") == "true":
            lines.append("- Forced past the checks")
        if tags.get(TAG + "promotion.reason"):
            lines.append(f"- Reason: {tags[TAG + 'promotion.reason']}")
        if tags.get(TAG + "promotion.previous_champion"):
            lines.append(f"- Previous champion: version {tags[TAG + 'promotion.previous_champion']}")
    if version:
        lines += [
            "",
            "## Use",
            "",
            "```python",
            "import mlflow",
            f'generate = mlflow.transformers.load_model("models:/{name}/{version}")',
            'print(generate("12+34=", max_new_tokens=6, do_sample=False))',
            "```",
        ]
    return "\n".join(lines) + "\n"
