"""Loading and saving a stage's model, whatever its form: one dispatch between full models and LoRA adapters.

- `load_stage_model`: a model to use (evaluate, merge, a DPO reference); an adapter folder comes
  back merged into its base.
- `load_for_training`: a trainer stage's input model: full, full + a fresh LoRA adapter (`lora:`
  set), or the adapter the previous stage passed on, continued on the same base.
- `save_stage_model`: a full model folder, or the adapter as its `lora.handoff` says.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import LoRAConfig, Params
from posttrain.errors import ParamsError
from posttrain.layout import Layout
from posttrain.lineage import parent_entry, verify_model_folder
from posttrain.models.build import LoadedModel, load_full_model, save_model
from posttrain.models.lora import (
    AdapterSetup,
    adapter_base_dir,
    check_same_shape,
    is_adapter_folder,
    load_base,
    load_merged,
    peft_lora_config,
    save_adapter_output,
)
from posttrain.runtime import Runtime

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def load_stage_model(
    model_dir: Path, *, trust_remote_code: bool = False, attn_implementation: str | None = None
) -> LoadedModel:
    """Load a model folder written by a stage, after checking its content hashes.

    A LoRA adapter passed on by its stage comes back merged into its base: whoever only uses the
    model needs no PEFT wrapper. Raises StageError when a file differs from its lineage record.
    `attn_implementation`: the runtime's (a model that trains beside it, e.g. DPO's reference).
    """
    if is_adapter_folder(model_dir):
        return load_merged(model_dir, trust_remote_code=trust_remote_code)
    return load_full_model(model_dir, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)


def load_for_training(layout: Layout, stage: str, parent: Path, params: Params, runtime: Runtime) -> LoadedModel:
    """A trainer stage's input model: full, full + fresh adapter, or a passed-on adapter on its base."""
    section = params.stage_section(stage)
    lora: LoRAConfig | None = getattr(section, "lora", None)
    trust = params.model.trust_remote_code
    adapter_input = is_adapter_folder(parent)
    if lora is None:
        if adapter_input:
            raise ParamsError(
                f"{stage}.lora: not set, but its input {parent} is a LoRA adapter passed on by the previous stage; "
                f"expected {stage}.lora to be set (the adapter is then trained further on the same base), or the "
                "previous stage to use lora.handoff: merge"
            )
        return load_full_model(parent, trust_remote_code=trust, attn_implementation=runtime.attn_implementation)

    from peft import PeftModel, get_peft_model

    if adapter_input:
        lineage = verify_model_folder(parent)
        base_dir = adapter_base_dir(parent, lineage)
        check_same_shape(stage, lora, parent)
        base = load_base(base_dir, stage, lora, runtime, trust)
        model = PeftModel.from_pretrained(base.model, parent, is_trainable=True)
        continued: str | None = parent_entry(parent, layout.root)["path"]
        log.info("%s: continuing the LoRA adapter of %s on its base %s", stage, parent, base_dir)
    else:
        base_dir = parent
        base = load_base(base_dir, stage, lora, runtime, trust)
        lineage = base.lineage
        model = get_peft_model(base.model, peft_lora_config(lora))
        continued = None
        log.info("%s: new LoRA adapter (r=%d, alpha=%g) on %s", stage, lora.r, lora.alpha, base_dir)
    # PEFT looks the base up by this name when saving (Trainer checkpoints included): the real folder,
    # never a relative name that could resolve elsewhere or be taken for a hub id.
    model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
    if section.gradient_checkpointing:
        # Checkpointed blocks over frozen embeddings would give the adapters no gradient otherwise.
        model.enable_input_require_grads()
    setup = AdapterSetup(
        stage=stage, lora=lora, base_dir=base_dir, base=parent_entry(base_dir, layout.root), continued_from=continued
    )
    return LoadedModel(model=model, tokenizer=base.tokenizer, path=parent, lineage=lineage, adapter=setup)


def save_stage_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    *,
    adapter: AdapterSetup | None,
    final: Path,
    state_dict: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Write a trained model into `folder`; with an `adapter`, as its handoff says.

    Returns lineage's `adapter` record (None for a full model). `final` is where `folder` will be
    renamed to (the adapter record names its base relative to it).
    """
    if adapter is None:
        save_model(model, tokenizer, folder, state_dict=state_dict)
        return None
    return save_adapter_output(model, tokenizer, folder, adapter, final=final, state_dict=state_dict)
