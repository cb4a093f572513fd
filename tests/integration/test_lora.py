"""LoRA through PEFT and the two adapter hand-offs between stages, run for real on the tiny model.

One module-scoped project: pretrain (full, from scratch) -> cpt with a fresh adapter passed on ->
sft continuing that adapter and passing it on again -> sft rerun with `handoff: merge` (and
gradient checkpointing on). Each stage runs 6 steps on a ~20k-parameter Llama.
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers.projects import TRAINING, make_project
from helpers.tiny import tiny_raw
from safetensors.torch import load_file

from posttrain.config import ComputeConfig, LoRAConfig, parse_params
from posttrain.errors import ParamsError, StageError
from posttrain.lineage import file_hashes, verify_model_folder
from posttrain.models import lora
from posttrain.models.loading import load_stage_model
from posttrain.runtime import setup_runtime
from posttrain.training.trl_config import trl_config

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0}


def _raw(cpt_handoff: str | None, sft_handoff: str | None, **sft_extra):
    raw = tiny_raw(TRAINING)
    raw["compute"]["num_threads"] = 1
    for stage in ("pretrain", "cpt", "sft"):
        raw[stage]["eval_every"] = 0  # the hand-off is under test here, not the eval series
        raw[stage]["eval_items"] = 4
    if cpt_handoff:
        raw["cpt"]["lora"] = {**LORA, "handoff": cpt_handoff}
    if sft_handoff:
        raw["sft"]["lora"] = {**LORA, "handoff": sft_handoff}
    raw["sft"].update(sft_extra)
    return raw


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    import stages.cpt
    import stages.pretrain
    import stages.sft

    params, layout = make_project(tmp_path_factory.mktemp("lora"), _raw("pass_on", "pass_on"))
    stages.pretrain.run(params, layout)
    base_hashes = file_hashes(layout.model("pretrain"))
    stages.cpt.run(params, layout)
    cpt_adapter = load_file(layout.model("cpt") / "adapter_model.safetensors")
    stages.sft.run(params, layout)
    sft_lineage = verify_model_folder(layout.model("sft"))
    sft_adapter = load_file(layout.model("sft") / "adapter_model.safetensors")
    # The same sft stage again, now merging its adapter on output (gradient checkpointing on).
    merge_params = parse_params(_raw("pass_on", "merge", gradient_checkpointing=True))
    stages.sft.run(merge_params, layout)
    return {
        "layout": layout,
        "base_hashes": base_hashes,
        "cpt_adapter": cpt_adapter,
        "sft_adapter": sft_adapter,
        "sft_pass_on_lineage": sft_lineage,
    }


def test_pass_on_writes_adapter_folder_pointing_at_its_base(chain):
    layout = chain["layout"]
    folder = layout.model("cpt")
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    assert not (folder / "model.safetensors").exists()
    lineage = verify_model_folder(folder)
    base = verify_model_folder(layout.model("pretrain"))
    assert lineage["adapter"]["handoff"] == "pass_on" and lineage["adapter"]["continued_from"] is None
    assert lineage["adapter"]["base"]["content_hash"] == base["content_hash"]
    assert lineage["adapter"]["base"]["relative_path"] == "../pretrain"
    assert [p["stage"] for p in lineage["parents"]] == ["pretrain"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == "artifacts/models/pretrain"
    # Only the low-rank matrices travel: no copy of the base's embedding or output head.
    assert chain["cpt_adapter"] and all("lora_A" in k or "lora_B" in k for k in chain["cpt_adapter"])
    metrics = json.loads(layout.metrics("cpt").read_text())
    assert 0 < metrics["trainable_parameters"] < metrics["parameters"] / 2


def test_next_stage_trains_the_same_adapter_further_on_an_unchanged_base(chain):
    layout, lineage = chain["layout"], chain["sft_pass_on_lineage"]
    assert lineage["adapter"]["continued_from"] == "artifacts/models/cpt"
    assert [p["stage"] for p in lineage["parents"]] == ["cpt"]
    base = verify_model_folder(layout.model("pretrain"))
    assert lineage["adapter"]["base"]["content_hash"] == base["content_hash"]
    assert file_hashes(layout.model("pretrain")) == chain["base_hashes"]  # the base never changes
    cpt, sft = chain["cpt_adapter"], chain["sft_adapter"]
    assert cpt.keys() == sft.keys() and all(cpt[k].shape == sft[k].shape for k in cpt)
    # Trained further: every tensor moved, but only by a few optimizer steps' worth (lr 3e-3, 6 steps).
    # A fresh adapter would differ by its random init instead (lora_A ~ U(-0.18, 0.18) here).
    for key in cpt:
        diff = (sft[key] - cpt[key]).abs()
        assert diff.max() > 0, key
        if "lora_A" in key:
            assert diff.mean() < 0.03, key


def test_consumers_load_a_passed_on_adapter_merged(chain):
    import torch

    layout = chain["layout"]
    merged = load_stage_model(layout.model("cpt")).model  # what evaluate / merge / a DPO reference get
    base = load_stage_model(layout.model("pretrain")).model
    assert type(merged).__name__ == "LlamaForCausalLM"
    adapter = chain["cpt_adapter"]
    a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    delta = merged.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(delta, (b @ a) * (LORA["alpha"] / LORA["r"]), atol=1e-6)


def test_merge_handoff_writes_a_plain_model_folder(chain):
    import torch
    from transformers import AutoModelForCausalLM

    layout = chain["layout"]
    folder = layout.model("sft")
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    lineage = verify_model_folder(folder)
    assert lineage["adapter"]["handoff"] == "merge"
    assert lineage["adapter"]["continued_from"] == "artifacts/models/cpt"
    assert lineage["params"]["gradient_checkpointing"] is True
    weights = load_file(folder / "model.safetensors")
    assert not [k for k in weights if "lora" in k]
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no PEFT involved
    assert type(model).__name__ == "LlamaForCausalLM"
    base = load_stage_model(layout.model("pretrain")).model
    delta = model.model.layers[1].mlp.down_proj.weight - base.model.layers[1].mlp.down_proj.weight
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta) <= LORA["r"]  # base + a rank-4 update
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # not targeted
    assert file_hashes(layout.model("pretrain")) == chain["base_hashes"]


def test_adapter_input_needs_lora_in_the_next_stage(chain):
    import stages.sft

    with pytest.raises(ParamsError, match=r"sft\.lora: not set, but its input .*cpt is a LoRA adapter"):
        stages.sft.run(parse_params(_raw("pass_on", None)), chain["layout"])


def test_continued_adapter_keeps_its_rank(chain):
    import stages.sft

    raw = _raw("pass_on", "pass_on")
    raw["sft"]["lora"]["r"] = 8
    with pytest.raises(ParamsError, match=r"sft\.lora\.r: got 8, but the adapter .* has r=4"):
        stages.sft.run(parse_params(raw), chain["layout"])


def test_adapter_whose_base_changed_is_refused(chain, tmp_path):
    models = tmp_path / "artifacts" / "models"
    for stage in ("pretrain", "cpt"):
        shutil.copytree(chain["layout"].model(stage), models / stage)
    lineage_path = models / "pretrain" / "lineage.json"
    lineage = json.loads(lineage_path.read_text())
    lineage["content_hash"] = "0" * 64  # as if pretrain had been rerun since the adapter was trained
    lineage_path.write_text(json.dumps(lineage))
    with pytest.raises(StageError, match=r"its base .*pretrain changed since the adapter was trained"):
        load_stage_model(models / "cpt")


def test_lora_on_a_stage_that_trains_from_scratch_is_refused(tmp_path):
    import stages.pretrain

    raw = _raw(None, None)
    raw["pretrain"]["lora"] = dict(LORA)
    params, layout = make_project(tmp_path, raw)
    with pytest.raises(ParamsError, match=r"pretrain\.lora: set, but stage pretrain does not load"):
        stages.pretrain.run(params, layout)


# --------------------------------------------------------------------------- other memory levers


def _runtime():
    return setup_runtime(ComputeConfig(device="cpu", num_threads=1), seed=0)


def test_qlora_on_cpu_is_a_clear_error():
    with pytest.raises(ParamsError, match=r"sft\.lora\.quantization: got '4bit' on cpu; QLoRA .* needs a CUDA GPU"):
        lora.check_quantization("sft", LoRAConfig(quantization="4bit"), _runtime())
    lora.check_quantization("sft", LoRAConfig(), _runtime())  # plain LoRA is fine on CPU


def test_gradient_checkpointing_and_packing_reach_trl(tmp_path):
    from trl import DPOConfig, SFTConfig

    raw = tiny_raw(TRAINING, sft={"gradient_checkpointing": True, "packing": True}, dpo={"packing": True})
    params = parse_params(raw)
    config = trl_config(SFTConfig, "sft", params.sft, _runtime(), tmp_path)
    assert config.activation_checkpointing is True and config.packing is True
    default = trl_config(SFTConfig, "sft", parse_params(tiny_raw(TRAINING)).sft, _runtime(), tmp_path)
    assert default.activation_checkpointing is False and default.packing is False  # CPU default kept
    with pytest.raises(ParamsError, match=r"dpo\.packing: got true, but TRL's DPOConfig has no packing"):
        trl_config(DPOConfig, "dpo", params.dpo, _runtime(), tmp_path)


def test_lora_config_is_validated():
    raw = tiny_raw(TRAINING, sft={"lora": {"r": 0, "handoff": "keep"}})
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert "sft.lora.r" in str(error.value) and "sft.lora.handoff" in str(error.value)
