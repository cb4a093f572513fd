"""The shared training core and the pretrain -> cpt -> sft stages, run for real on a tiny model.

One module-scoped project runs the three stages for 6 steps each (a few seconds); the other tests
check the pieces: TRL config mapping, completion-only labels, the NaN guard, atomic outputs,
checkpoint markers, length checks and the pretrained-base bootstrap.
"""

from __future__ import annotations

import json

import pytest
from helpers.projects import TRAINING, make_project, write_mixture
from helpers.tiny import tiny_raw

from posttrain.config import ComputeConfig, parse_params
from posttrain.errors import DataError, ParamsError, StageError
from posttrain.lineage import file_hashes, verify_model_folder
from posttrain.models.loading import load_stage_model
from posttrain.runtime import setup_runtime
from posttrain.training import outputs
from posttrain.training.callbacks import SERIES_FILE
from posttrain.training.checkpoints import COMPLETE_MARKER, find_resume_checkpoint
from posttrain.training.inputs import load_prompt_completion_mixture, load_text_mixture, read_mixture
from posttrain.training.trl_config import trl_config, with_schedule

STAGES = ("pretrain", "cpt", "sft")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """pretrain, cpt and sft run one after another in one tiny project."""
    import stages.cpt
    import stages.pretrain
    import stages.sft

    params, layout = make_project(tmp_path_factory.mktemp("chain"))
    results = {}
    for module in (stages.pretrain, stages.cpt, stages.sft):
        results[module.STAGE] = module.run(params, layout)
    return params, layout, results


@pytest.mark.parametrize("stage", STAGES)
def test_stage_writes_model_lineage_metrics_and_plots(chain, stage):
    params, layout, results = chain
    folder = layout.model(stage)
    assert results[stage].model_dir == folder
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "lineage.json"):
        assert (folder / name).is_file(), name
    lineage = verify_model_folder(folder)
    assert lineage["stage"] == stage and lineage["seed"] == params.seed
    assert lineage["data_manifest_hash"] is not None and lineage["params_hash"]
    expected_parent = {"pretrain": [], "cpt": ["pretrain"], "sft": ["cpt"]}[stage]
    assert [p["stage"] for p in lineage["parents"]] == expected_parent
    if expected_parent:
        parent_hash = verify_model_folder(layout.model(expected_parent[0]))["content_hash"]
        assert lineage["parents"][0]["content_hash"] == parent_hash
    load_stage_model(folder)  # hashes and tokenizer/model fit check out

    metrics = json.loads(layout.metrics(stage).read_text())
    assert metrics["steps"] == 6 and metrics["steps_this_run"] == 6
    assert metrics["first_train_loss"] > 0 and metrics["final_train_loss"] > 0
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0 and metrics["peak_rss_mb"] > 0
    assert set(metrics["val_before"]) == set(params.data.domains) == set(metrics["val_after"])
    assert sorted({row["step"] for row in metrics["continual_eval"]}) == [0, 3, 6]  # eval_every 3
    # Steps 3 and 6 were scored inside trainer.train(): their time is split out of the training rates.
    assert 0 < metrics["eval_seconds"] < metrics["seconds"]
    training_seconds = metrics["seconds"] - metrics["eval_seconds"]  # each rounded to 0.01 s
    low, high = (metrics["tokens_seen"] / (training_seconds + d) for d in (0.011, -0.011))
    assert low <= metrics["tokens_per_second"] <= high
    assert (layout.plots / f"{stage}_continual_eval.png").stat().st_size > 1000
    assert json.loads((layout.plots / f"{stage}_continual_eval.json").read_text()) == metrics["continual_eval"]


def test_training_lowers_validation_loss_on_target_domains(chain):
    _, layout, _ = chain
    targets = {"pretrain": "add", "cpt": "sub", "sft": "add"}
    for stage, domain in targets.items():
        metrics = json.loads(layout.metrics(stage).read_text())
        assert metrics["val_after"][domain]["loss"] < metrics["val_before"][domain]["loss"], stage


def test_checkpoints_carry_complete_marker_and_eval_series(chain):
    _, layout, _ = chain
    lineage = verify_model_folder(layout.model("cpt"))
    ckpt_dir = layout.root / lineage["checkpoints"]
    found = sorted(p.name for p in ckpt_dir.glob("checkpoint-*"))
    assert found == ["checkpoint-3", "checkpoint-6"]
    for name in found:
        assert (ckpt_dir / name / COMPLETE_MARKER).is_file()
        assert json.loads((ckpt_dir / name / SERIES_FILE).read_text())
    assert find_resume_checkpoint(ckpt_dir) == ckpt_dir / "checkpoint-6"


def test_find_resume_checkpoint_skips_half_written(tmp_path):
    for step in (10, 20, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-10" / "COMPLETE").write_text("{}")
    (tmp_path / "checkpoint-20" / "COMPLETE").write_text("{}")
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    assert find_resume_checkpoint(tmp_path, remove_incomplete=True) == tmp_path / "checkpoint-20"
    assert not (tmp_path / "checkpoint-30").exists()
    assert find_resume_checkpoint(tmp_path / "missing") is None


# --------------------------------------------------------------------------- TRL config mapping


def _runtime():
    return setup_runtime(ComputeConfig(device="cpu"), seed=7)


def test_trl_config_cpu_defaults_and_pass_through(tmp_path):
    from trl import SFTConfig

    raw = tiny_raw(TRAINING, sft={"trainer": {"adam_beta2": 0.95, "save_total_limit": 2}})
    section = parse_params(raw).sft
    config = trl_config(SFTConfig, "sft", section, _runtime(), tmp_path, completion_only_loss=True)
    assert config.bf16 is False and config.use_cpu is True and config.activation_checkpointing is False
    assert config.report_to == [] or config.report_to == "none" or config.report_to == ["none"]
    assert config.adam_beta2 == 0.95 and config.save_total_limit == 2  # extras pass straight through
    assert config.max_steps == 6 and config.save_steps == 3 and config.seed == 7
    assert config.max_length == section.max_length and config.completion_only_loss is True
    assert config.logging_nan_inf_filter is False


def test_trl_config_unknown_key_names_the_params_path(tmp_path):
    from trl import SFTConfig

    section = parse_params(tiny_raw(TRAINING, sft={"trainer": {"adam_beta3": 0.9}})).sft
    with pytest.raises(ParamsError, match=r"sft\.trainer\.adam_beta3: unknown setting .*did you mean adam_beta2"):
        trl_config(SFTConfig, "sft", section, _runtime(), tmp_path)


def test_trl_config_bad_value_becomes_params_error(tmp_path):
    from trl import SFTConfig

    section = parse_params(tiny_raw(TRAINING, sft={"trainer": {"optim": "no_such_optimizer"}})).sft
    with pytest.raises(ParamsError, match=r"sft\.trainer: TRL's SFTConfig rejected"):
        trl_config(SFTConfig, "sft", section, _runtime(), tmp_path)


def test_sft_labels_cover_completion_and_eos_only(chain, tmp_path):
    """TRL 1.16 with a prompt-completion dataset: prompt labels -100, completion + EOS trained."""
    from trl import SFTConfig, SFTTrainer

    params, layout, _ = chain
    loaded = load_stage_model(layout.model("cpt"))
    data = load_prompt_completion_mixture(layout, "sft", loaded.tokenizer, params.sft)
    config = trl_config(SFTConfig, "sft", params.sft, _runtime(), tmp_path, completion_only_loss=True)
    trainer = with_schedule(SFTTrainer)(
        model=loaded.model,
        args=config,
        train_dataset=data,
        processing_class=loaded.tokenizer,
        schedule=params.sft.schedule,
    )
    tok = loaded.tokenizer
    for row in trainer.train_dataset.select(range(5)):
        ids, labels = row["input_ids"], row["labels"]
        n_prompt = len(tok(row["prompt"])["input_ids"])
        trained = [t for t, lab in zip(ids, labels, strict=False) if lab != -100]
        assert labels[:n_prompt] == [-100] * n_prompt
        assert trained == ids[n_prompt:]
        assert trained[-1] == tok.eos_token_id  # TRL appended EOS to the completion
        assert tok.decode(trained[:-1]) == row["completion"].removesuffix(tok.eos_token)
    # The schedule comes from posttrain.training.schedules.
    trainer.create_optimizer_and_scheduler(num_training_steps=6)
    from posttrain.training.schedules import lr_multiplier

    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(
        params.sft.trainer.learning_rate * lr_multiplier(0, 6, params.sft.schedule)
    )


# --------------------------------------------------------------------------- failures


def test_nan_guard_stops_stage_and_keeps_previous_output(chain):
    import stages.sft

    params, layout, _ = chain
    before_files = file_hashes(layout.model("sft"))
    before_metrics = layout.metrics("sft").read_text()
    raw = tiny_raw(TRAINING, sft={"trainer": {"learning_rate": 1e30, "max_grad_norm": 1e30}})
    with pytest.raises(StageError, match=r"(NaN/inf|is nan) .* no model written"):
        stages.sft.run(parse_params(raw), layout)
    assert file_hashes(layout.model("sft")) == before_files
    assert layout.metrics("sft").read_text() == before_metrics
    assert not list(layout.model("sft").parent.glob(".sft.tmp-*"))


def test_nan_guard_checks_weights_on_save_and_last_steps_only():
    import torch
    from transformers import TrainerControl, TrainerState

    from posttrain.training.callbacks import NonFiniteGuard

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    guard = NonFiniteGuard("sft")
    state = TrainerState(global_step=3, max_steps=10)
    guard.on_step_end(None, state, TrainerControl(), model=model)  # an ordinary step: no pass over the weights
    guard.on_step_end(None, state, TrainerControl(should_log=True), model=model)  # a log: the loss is checked
    for flags in ({"should_save": True}, {"should_training_stop": True}):
        with pytest.raises(StageError, match=r"NaN/inf at step 3"):
            guard.on_step_end(None, state, TrainerControl(**flags), model=model)
    with pytest.raises(StageError, match=r"NaN/inf at step 10"):
        guard.on_step_end(None, TrainerState(global_step=10, max_steps=10), TrainerControl(), model=model)


def test_failure_while_writing_output_keeps_previous_output(chain, monkeypatch):
    import stages.sft

    params, layout, _ = chain
    before = file_hashes(layout.model("sft"))

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated failure while writing lineage)")

    monkeypatch.setattr(outputs, "write_lineage", broken)
    raw = tiny_raw(TRAINING, sft={"trainer": {"max_steps": 2, "save_steps": 100}})
    with pytest.raises(OSError, match="disk full"):
        stages.sft.run(parse_params(raw), layout)
    assert file_hashes(layout.model("sft")) == before
    assert not list(layout.model("sft").parent.glob(".sft.tmp-*"))


def test_too_long_examples_are_refused_with_their_id(tmp_path):
    params, layout = make_project(tmp_path)
    from posttrain.models.build import build_scratch_model, train_tokenizer

    long_record = {"id": "longone", "domain": "add", "text": "1" * 40}
    write_mixture(layout, "cpt", [long_record], "text")
    tok = train_tokenizer(["12+34=46"], params.model.tokenizer)
    build_scratch_model(params.model.architecture, tok)
    with pytest.raises(DataError, match=r"longer than max_length=24 .*'longone' with 41 tokens"):
        load_text_mixture(layout, "cpt", tok, params.cpt)


def test_missing_mixture_column_is_named(tmp_path):
    import pandas as pd

    params, layout = make_project(tmp_path)
    pd.DataFrame({"id": ["a"], "prompt": ["1+1="]}).to_parquet(layout.mixture("sft") / "train.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['completion'\]"):
        read_mixture(layout, "sft", ["id", "prompt", "completion"])


def test_pretrain_with_given_base_writes_it_without_training(chain, tmp_path, monkeypatch):
    import stages.pretrain

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    _, chain_layout, _ = chain
    raw = tiny_raw(TRAINING)
    raw["model"]["base"] = str(chain_layout.model("sft"))
    params, layout = make_project(tmp_path / "p", raw)
    result = stages.pretrain.run(params, layout)
    lineage = verify_model_folder(result.model_dir)
    assert lineage["trained"] is False and lineage["base"] == raw["model"]["base"]
    assert lineage["parents"][0]["content_hash"] == verify_model_folder(chain_layout.model("sft"))["content_hash"]
    metrics = json.loads(layout.metrics("pretrain").read_text())
    assert metrics["steps"] == 0 and not (layout.root / "checkpoints").exists()
    # The re-saved weights are the base's weights.
    assert (result.model_dir / "model.safetensors").read_bytes() == (
        chain_layout.model("sft") / "model.safetensors"
    ).read_bytes()
