"""LoRA / QLoRA through PEFT, and the hand-off of adapters from one stage to the next.

A trainer stage whose section sets `lora:` trains a LoRA adapter instead of every weight.

Input (what `posttrain.models.loading.load_for_training` finds in the parent stage's folder):
- a full model folder (model.safetensors): a fresh adapter is put on it;
- an adapter folder passed on by the parent stage (adapter_config.json, and `adapter.base` in its
  lineage.json pointing at the full model it sits on): the SAME adapter is loaded trainable on the
  SAME base and trained further. The base's content hash is checked against the pointer. A stage
  without `lora:` refuses an adapter input (it would otherwise silently train something else).

Output (`<stage>.lora.handoff`, written by `save_adapter_output`):
- `merge`: the adapter is merged into a freshly loaded, unquantized copy of its base
  (`merge_and_unload`) and saved as an ordinary full model folder: the next stage sees a plain model.
- `pass_on`: the adapter folder (adapter_model.safetensors + adapter_config.json + tokenizer) and a
  lineage.json whose `adapter.base` names the base (path relative to the adapter folder + hash).

Stages that only use a model (evaluate, merge, a DPO reference) load an adapter folder merged:
`posttrain.models.loading.load_stage_model` delegates to `load_merged`. With a passed-on adapter, DPO's and
GRPO's reference is the adapter-free base (TRL disables the adapter when `ref_model=None`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import LoRAConfig
from posttrain.errors import ParamsError, StageError
from posttrain.lineage import content_hash, file_hashes, verify_model_folder
from posttrain.models import build, chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from posttrain.runtime import Runtime

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class AdapterSetup:
    """How a stage's adapter relates to its base; travels from loading.load_for_training to save_adapter_output."""

    stage: str
    lora: LoRAConfig
    base_dir: Path  # the full model folder the adapter sits on
    base: dict[str, Any]  # parent_entry of the base: stage, root-relative path, content hash
    continued_from: str | None  # root-relative path of the adapter folder this one continues, or None

    def lineage(self, final: Path) -> dict[str, Any]:
        """The `adapter` record of lineage.json (`final` = the stage's output folder)."""
        return {
            "handoff": self.lora.handoff,
            "base": {**self.base, "relative_path": os.path.relpath(self.base_dir.resolve(), final.resolve())},
            "continued_from": self.continued_from,
            "lora": self.lora.model_dump(mode="json"),
        }


def is_adapter_folder(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base_dir(adapter_dir: Path, lineage: dict[str, Any] | None) -> Path:
    """The verified base folder an adapter folder points at (StageError if it moved or changed)."""
    base = ((lineage or {}).get("adapter") or {}).get("base")
    if not base or "relative_path" not in base:
        raise StageError(
            f"{adapter_dir}: a LoRA adapter folder without `adapter.base` in its lineage.json; expected a folder "
            "written by a stage with lora.handoff: pass_on"
        )
    path = (adapter_dir / base["relative_path"]).resolve()
    base_lineage = verify_model_folder(path)  # also fails when the folder is missing
    found = (base_lineage or {}).get("content_hash") or content_hash(file_hashes(path))
    if found != base["content_hash"]:
        raise StageError(
            f"{adapter_dir}: its base {path} changed since the adapter was trained (recorded content hash "
            f"{base['content_hash']}, found {found}); rerun the stage that wrote the adapter"
        )
    return path


def check_quantization(stage: str, lora: LoRAConfig, runtime: Runtime) -> None:
    """QLoRA needs bitsandbytes and a CUDA device: say so before any model is loaded."""
    if lora.quantization is None:
        return
    if runtime.device != "cuda":
        raise ParamsError(
            f"{stage}.lora.quantization: got {lora.quantization!r} on {runtime.device}; QLoRA (bitsandbytes) needs a "
            "CUDA GPU. Expected null here, or run on a GPU machine"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ParamsError(
            f"{stage}.lora.quantization: got {lora.quantization!r} but bitsandbytes is not installed; "
            "install it with `pip install -e .[bitsandbytes]`"
        )


def peft_lora_config(lora: LoRAConfig) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def load_base(folder: Path, stage: str, lora: LoRAConfig, runtime: Runtime, trust: bool) -> build.LoadedModel:
    """The full model an adapter trains on: as the stage wrote it, or 4/8-bit for QLoRA."""
    check_quantization(stage, lora, runtime)
    attention = build.attention_kwargs(runtime.attn_implementation)
    if lora.quantization is None:
        return build.load_full_model(folder, trust_remote_code=trust, attn_implementation=runtime.attn_implementation)
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    lineage = verify_model_folder(folder)
    compute_dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float16
    if lora.quantization == "4bit":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            # Lets FSDP shard the quantized weights (they must share one storage dtype).
            bnb_4bit_quant_storage=compute_dtype,
        )
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, dtype=compute_dtype, device_map={"": local_rank},
        use_safetensors=True, trust_remote_code=trust, **attention,
    )  # fmt: skip
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    build.check_tokenizer_fits(model, tokenizer, where=str(folder))
    return build.LoadedModel(model=model, tokenizer=tokenizer, path=folder, lineage=lineage)


def check_same_shape(stage: str, lora: LoRAConfig, adapter_dir: Path) -> None:
    saved = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    for ours, theirs in (("r", "r"), ("alpha", "lora_alpha")):
        if float(getattr(lora, ours)) != float(saved.get(theirs)):
            raise ParamsError(
                f"{stage}.lora.{ours}: got {getattr(lora, ours)!r}, but the adapter passed on in {adapter_dir} has "
                f"{theirs}={saved.get(theirs)!r}; a continued adapter keeps its shape, expected the same value"
            )


def merged_model(base_dir: Path, adapter_dir: Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """A fresh, unquantized copy of the base with the adapter merged in (merge_and_unload)."""
    from peft import PeftModel

    base = build.load_full_model(base_dir, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base.model, adapter_dir).merge_and_unload()


def load_merged(adapter_dir: Path, *, trust_remote_code: bool = False) -> build.LoadedModel:
    """An adapter folder as a plain model, for stages that only use it (evaluate, merge, references)."""
    from transformers import AutoTokenizer

    lineage = verify_model_folder(adapter_dir)
    base_dir = adapter_base_dir(adapter_dir, lineage)
    model = merged_model(base_dir, adapter_dir, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    build.check_tokenizer_fits(model, tokenizer, where=str(adapter_dir))
    chat_template.check_against_lineage(tokenizer, lineage, str(adapter_dir))
    return build.LoadedModel(model=model, tokenizer=tokenizer, path=adapter_dir, lineage=lineage)


def save_adapter_output(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    setup: AdapterSetup,
    *,
    final: Path,
    state_dict: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the trained adapter into `folder` as `setup.lora.handoff` says; return lineage's `adapter` record.

    `state_dict`: the full gathered state dict under FSDP / ZeRO-3 (PEFT picks the adapter keys from it).
    """
    # A root-relative name instead of the absolute path the base was loaded from: the adapter
    # folder's hash must not depend on where the project lives.
    peft_config = model.peft_config["default"]
    loaded_from, peft_config.base_model_name_or_path = peft_config.base_model_name_or_path, setup.base["path"]
    try:
        _save_adapter(model, tokenizer, folder, setup, state_dict)
    finally:
        peft_config.base_model_name_or_path = loaded_from
    return setup.lineage(final)


def _save_adapter(
    model: Any, tokenizer: PreTrainedTokenizerBase, folder: Path, setup: AdapterSetup, state_dict: dict[str, Any] | None
) -> None:
    # save_embedding_layers "auto" would look the base name up (on the hub, too) and may copy the
    # whole embedding matrix into the adapter; the pipeline never resizes embeddings.
    save = {"state_dict": state_dict, "safe_serialization": True, "save_embedding_layers": False}
    if setup.lora.handoff == "pass_on":
        model.save_pretrained(folder, **save)
        tokenizer.save_pretrained(folder)
    else:
        with tempfile.TemporaryDirectory(prefix=".adapter-", dir=folder.parent) as scratch:
            model.save_pretrained(scratch, **save)
            merged = merged_model(setup.base_dir, Path(scratch))
        build.save_model(merged, tokenizer, folder)
