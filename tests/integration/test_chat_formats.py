"""Each TRL data format from a user file through prepare → mix → a trainer stage (tiny model, ChatML
template), and the one-template rule at a stage boundary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.projects import build_trained_input_project
from helpers.tiny import tiny_raw

from posttrain.config import parse_params
from posttrain.errors import StageError
from posttrain.lineage import parent_entry
from posttrain.models import build, chat_template
from posttrain.models.loading import load_stage_model
from posttrain.training.outputs import write_model_output

STEPS = {"max_steps": 2, "logging_steps": 1, "save_steps": 2, "per_device_train_batch_size": 4}
STAGE = {"trainer": STEPS, "max_length": 64, "eval_items": 4}


def _user(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


def _assistant(a: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": a}]


def _rows(kind: str) -> list[dict[str, Any]]:
    rows = []
    for i in range(40):
        # Products, not sums: the tiny recipe's built-in domains hold sums, and decontamination
        # would (rightly) refuse a user item equal to one of theirs.
        a, b = 10 + i, 3 + i % 7
        q, good, bad = f"{a}*{b}=", str(a * b), str(a * b + 10)
        rows.append(
            {
                "text": {"text": f"{q}{good}"},
                "prompt_completion": {"prompt": q, "completion": good},
                "messages": {"messages": _user(q) + _assistant(good)},
                "chat_prompt_completion": {"prompt": _user(q), "completion": _assistant(good)},
                "preference": {"prompt": q, "chosen": good, "rejected": bad},
                "chat_preference": {"prompt": _user(q), "chosen": _assistant(good), "rejected": _assistant(bad)},
                "implicit_preference": {"chosen": _user(q) + _assistant(good), "rejected": _user(q) + _assistant(bad)},
                "chat_prompt_only": {"prompt": _user(q), "answer": good},
            }[kind]
        )
    return rows


# (file format, mixture format, stage trained on it, the stage whose model it starts from)
CASES = [
    ("text", "text", "cpt", "pretrain"),
    ("prompt_completion", "prompt_completion", "sft", "cpt"),
    ("messages", "conversational", "sft", "cpt"),
    ("chat_prompt_completion", "prompt_completion", "sft", "cpt"),
    ("preference", "preference", "dpo", "sft"),
    ("chat_preference", "preference", "dpo", "sft"),
    ("implicit_preference", "preference", "dpo", "sft"),
    ("chat_prompt_only", "prompt_answer", "grpo", "dpo"),
]


@pytest.mark.parametrize(("kind", "fmt", "stage", "parent"), CASES, ids=[c[0] for c in CASES])
def test_user_format_trains_through_its_stage(tmp_path: Path, kind: str, fmt: str, stage: str, parent: str) -> None:
    import importlib

    data = tmp_path / "user.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(kind)))
    raw = tiny_raw(model={"chat_template": "chatml"}, **{s: STAGE for s in ("cpt", "sft", "dpo", "grpo")})
    raw["data"]["domains"]["user"] = {"kind": "file", "path": str(data)}
    raw["data"]["split"]["val_fraction"] = 0.2  # a small file: keep every split non-empty (prepare refuses empty ones)
    # Plain built-in domains elsewhere; the tested stage's mixture is the user's file alone.
    raw["mixtures"]["dpo"]["weights"] = {"add": 1.0}
    raw["mixtures"][stage] = {"format": fmt, "weights": {"user": 1.0}, "total": 32, "temperature": 1.0}
    if stage == "grpo":
        raw["grpo"]["rewards"] = [{"name": "exact_match", "weight": 1.0}]
    params = parse_params(raw)
    layout = build_trained_input_project(params, tmp_path, parent)

    importlib.import_module(f"stages.{stage}").run(params, layout)

    lineage = json.loads((layout.model(stage) / "lineage.json").read_text())
    metrics = json.loads(layout.metrics(stage).read_text())
    assert metrics["steps"] == 2 and metrics["first_train_loss"] is not None
    assert lineage[chat_template.LINEAGE_KEY] == lineage["parents"][0][chat_template.LINEAGE_KEY]
    assert lineage[chat_template.LINEAGE_KEY] == chat_template.folder_fingerprint(layout.model(parent))


def test_a_different_template_is_refused_at_the_stage_boundary(tmp_path: Path) -> None:
    params = parse_params(tiny_raw(model={"chat_template": "chatml"}))
    layout = build_trained_input_project(params, tmp_path, "sft")
    sft = load_stage_model(layout.model("sft"))
    parents = [parent_entry(layout.model("sft"), layout.root)]

    # A child whose tokenizer carries another template than its parent's: refused, both named.
    jinja = tmp_path / "other.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    chat_template.install(sft.tokenizer, str(jinja), tmp_path)
    with pytest.raises(StageError, match=r"chat template mismatch: the dpo model .* its parent artifacts/models/sft"):
        write_model_output(
            "dpo", sft.model, sft.tokenizer, params=params, layout=layout, section=params.dpo, parents=parents,
            data_manifest=None, metrics={},
        )  # fmt: skip
    assert not layout.model("dpo").exists()

    # A model folder whose recorded parent fingerprint differs from its own: refused on load.
    build.install_template(sft.model, sft.tokenizer, params.model, tmp_path)  # back to ChatML
    write_model_output(
        "dpo", sft.model, sft.tokenizer, params=params, layout=layout, section=params.dpo, parents=parents,
        data_manifest=None, metrics={},
    )  # fmt: skip
    record = json.loads((layout.model("dpo") / "lineage.json").read_text())
    record["parents"][0][chat_template.LINEAGE_KEY] = "0" * 64
    (layout.model("dpo") / "lineage.json").write_text(json.dumps(record))
    with pytest.raises(StageError, match=r"chat template mismatch: .*models/dpo has fingerprint .* parent .*sft"):
        load_stage_model(layout.model("dpo"))


def test_evaluate_writes_lm_eval_scores_beside_its_own(tmp_path: Path) -> None:
    from stages import evaluate

    raw = tiny_raw(model={"chat_template": "chatml"})
    raw["data"]["domains"]["add"]["chat"] = True
    raw["mixtures"]["dpo"]["weights"] = {"add3": 1.0}
    raw["mixtures"]["sft"]["weights"] = {"sub": 1.0}
    raw["evaluate"] = {
        **raw["evaluate"],
        "models": ["sft"],
        "domains": ["add", "rev"],
        "max_items": 6,
        "lm_eval": {"tasks": [{"domain": "add", "kind": "generate"}, {"domain": "rev", "kind": "perplexity"}],
                    "max_items": 4, "batch_size": 4},
    }  # fmt: skip
    params = parse_params(raw)
    layout = build_trained_input_project(params, tmp_path, "sft")

    evaluate.run(params, layout)

    report = json.loads(layout.metrics("eval").read_text())
    assert report["models"]["sft"]["domains"]["add"]["exact_match"]["n"] == 6  # the pipeline's own, chat-rendered
    scores = report["lm_eval"]["sft"]
    assert scores["add_generate"]["n"] == 4 and 0.0 <= scores["add_generate"]["exact_match"] <= 1.0
    assert scores["add_generate"]["exact_match_stderr"] is not None
    assert scores["rev_perplexity"]["word_perplexity"] > 1.0
    assert scores["rev_perplexity"]["word_perplexity_stderr"] is None  # lm-eval gives none for corpus perplexity
