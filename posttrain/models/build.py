"""Model and tokenizer factory: build from scratch, load a base, load and save full model folders.

- `model.base: scratch`: a BPE tokenizer trained on the pipeline's own texts (digits are single
  tokens, so arithmetic is learnable) and a tiny `LlamaForCausalLM` from `model.architecture`.
- anything else: `from_pretrained` of a hub id or a local folder (safetensors only).
- a stage's input model (`artifacts/models/<stage>`) is checked against its `lineage.json` hashes
  before it is used, and its tokenizer is checked against its embedding matrix.

Heavy imports (torch, transformers, tokenizers) happen inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import ArchitectureConfig, ModelConfig, TokenizerConfig
from posttrain.errors import StageError
from posttrain.lineage import verify_model_folder
from posttrain.models import chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
# Metaspace marks spaces as "▁" inside tokens, so decoding gives back the exact string.
_SPACE = "\u2581"


@dataclass
class LoadedModel:
    """A model with its tokenizer, the folder it came from and that folder's lineage record."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path | None = None
    lineage: dict[str, Any] | None = None
    # Set when `model` carries a LoRA adapter (posttrain.models.lora.AdapterSetup): base and hand-off.
    adapter: Any = None


# --------------------------------------------------------------------------- from scratch


def train_tokenizer(
    texts: Iterable[str], cfg: TokenizerConfig, max_length: int = 512, extra_special: Iterable[str] = ()
) -> PreTrainedTokenizerBase:
    """Train a BPE tokenizer on `texts`: every digit its own token, punctuation isolated.

    `extra_special`: further special tokens trained in (a chat template's, `chat_template.special_tokens_of`).
    `cfg.bos`: a post-processor puts `<s>` in front of every text encoded with special tokens.

    Isolating punctuation keeps merges from crossing `=` or `:`, so a prompt such as `12+34=`
    tokenizes to a prefix of `12+34=46`: the prompt/completion boundary is a token boundary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *([BOS_TOKEN] if cfg.bos else []), *extra_special],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        # BPE keeps every character it saw: the asked size was silently exceeded (validate checks
        # the synthetic domains; file domains are known only here).
        raise StageError(
            f"model.tokenizer.vocab_size: got {cfg.vocab_size}, but the training texts need "
            f"{tokenizer.get_vocab_size()} tokens (every character plus special tokens); expected at least that"
        )
    if cfg.bos:
        bos = tokenizer.token_to_id(BOS_TOKEN)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN if cfg.bos else None,
        model_max_length=max_length,
        padding_side="right",
    )
    return wrapped


def load_tokenizer_folder(path: str, root: Path) -> PreTrainedTokenizerBase:
    """`model.tokenizer.path`: a real tokenizer from a local folder (relative to `root`), for a scratch model
    of realistic shape (vocabulary, special tokens). Never a hub id: a scratch recipe runs offline."""
    from transformers import AutoTokenizer

    folder = Path(path) if Path(path).is_absolute() else root / path
    if not folder.is_dir():
        raise StageError(
            f"model.tokenizer.path: {path!r} is not a folder (looked in {folder}); expected a local folder with "
            "tokenizer.json and tokenizer_config.json, e.g. models/smollm2-135m-instruct (scripts/fetch_smollm2.py)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise StageError(f"model.tokenizer.path: cannot load a tokenizer from {folder} ({error})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding positions are masked out anyway
    return tokenizer


def attention_kwargs(attn_implementation: str | None) -> dict[str, Any]:
    """from_pretrained / from_config keyword for the runtime's attention (none: transformers' default)."""
    return {"attn_implementation": attn_implementation} if attn_implementation else {}


def build_scratch_model(
    cfg: ArchitectureConfig, tokenizer: PreTrainedTokenizerBase, attn_implementation: str | None = None
) -> PreTrainedModel:
    """A randomly initialised LlamaForCausalLM sized by `cfg`, its vocabulary that of `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # The tokenizer's BOS, if it adds one (model.tokenizer.bos); None: it adds no special tokens.
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    _set_generation_ids(model, tokenizer)
    return model


def apply_kernels(model: PreTrainedModel, kernels: str) -> None:
    """Fused layer kernels on the model instance (`Runtime.kernels`, resolved from compute.kernels).

    liger  liger-kernel's RMSNorm, RoPE and SwiGLU kernels, the call TRL's deprecated `use_liger_kernel`
           made; its fused linear cross-entropy stays off, since TRL 1.16 computes SFT's and DPO's loss
           through its own chunked LM head (trl.trainer.utils.add_fused_lm_head), never full logits.
    hub    transformers' `use_kernels` (TRL 1.16's replacement: `model_init_kwargs={"use_kernels": True}`,
           which TRL ignores for a model object like ours, so it is applied to the object here).
    """
    if kernels == "none":
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a LoRA adapter
    if kernels == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=False, cross_entropy=False)
    else:
        base.set_use_kernels(True)
    log.info("kernels: %s applied to %s", kernels, type(base).__name__)


# --------------------------------------------------------------------------- pretrained bases


def install_template(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, root: Path
) -> str | None:
    """Put `model.chat_template` on the tokenizer (resizing the embeddings for tokens it adds) and
    keep the model's EOS/PAD in step; returns the template fingerprint (None: no template chosen)."""
    if cfg.chat_template is None:
        return None
    added = chat_template.install(tokenizer, cfg.chat_template, root)
    if added:
        add_token_rows(model, len(tokenizer))
        log.info(
            "chat template %r: %d special token(s) added, their embedding rows set to the mean of the others",
            cfg.chat_template,
            added,
        )
    _set_generation_ids(model, tokenizer)
    return chat_template.fingerprint(tokenizer)


def add_token_rows(model: PreTrainedModel, size: int) -> None:
    """Grow the embedding matrix (and an untied output head) to `size` rows, each new row the mean of the
    existing rows.

    A new token then starts as an average token: its logit is about the average logit, so the model
    neither emits it everywhere nor can never learn to emit it, and its input vector sits inside the
    distribution the layers were trained on (Hewitt, "Initializing new word embeddings for pretrained
    language models", 2021). Set here explicitly rather than left to `resize_token_embeddings`' default,
    which samples around the mean and may change between transformers versions.
    """
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        layers = [model.get_input_embeddings()]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not layers[0].weight:
            layers.append(head)
        for layer in layers:
            layer.weight[old:] = layer.weight[:old].mean(dim=0, keepdim=True)


def load_base(cfg: ModelConfig, root: Path | None = None) -> LoadedModel:
    """`from_pretrained` of `cfg.base` (hub id or local folder); safetensors only. With
    `model.chat_template` set, that template is installed (a Jinja path is relative to `root`).

    Tests and offline machines set HF_HUB_OFFLINE=1: a hub id that is not cached then fails here
    with a StageError instead of a download.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.base, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(cfg.base, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as error:
        raise StageError(
            f"model.base {cfg.base!r}: cannot load it with from_pretrained ({error}); expected a local folder "
            "with config.json, model.safetensors and tokenizer files, or a cached hub id"
        ) from None
    if tokenizer.pad_token_id is None:
        # Most causal LMs ship without a pad token; padding positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    path = Path(cfg.base) if Path(cfg.base).is_dir() else None
    _set_generation_ids(model, tokenizer)
    install_template(model, tokenizer, cfg, root or Path.cwd())
    check_tokenizer_fits(model, tokenizer, where=f"model.base {cfg.base!r}")
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, lineage=None)


# --------------------------------------------------------------------------- stage models


def load_full_model(
    model_dir: Path, *, trust_remote_code: bool = False, attn_implementation: str | None = None
) -> LoadedModel:
    """Load a full model folder (not an adapter) written by a stage, after checking its content hashes.

    Raises StageError when a file differs from its lineage record (both hashes shown) or when the
    tokenizer does not fit the model. `posttrain.models.loading.load_stage_model` dispatches here.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lineage = verify_model_folder(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        # safetensors only: a pickle checkpoint (pytorch_model.bin) can run code when unpickled.
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **attention_kwargs(attn_implementation),
        )
    except (OSError, ValueError) as error:
        raise StageError(
            f"{model_dir}: cannot load the model ({error}); expected a save_pretrained folder with "
            "model.safetensors (pickle weights such as pytorch_model.bin are refused)"
        ) from None
    check_tokenizer_fits(model, tokenizer, where=str(model_dir))
    chat_template.check_against_lineage(tokenizer, lineage, str(model_dir))
    return LoadedModel(model=model, tokenizer=tokenizer, path=model_dir, lineage=lineage)


def check_tokenizer_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, where: str) -> None:
    """The tokenizer must index into the embedding matrix and agree with the model on EOS and PAD."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise StageError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embedding matrix has {rows} rows; "
            "expected a tokenizer vocabulary no larger than the embedding (wrong tokenizer for this model?)"
        )
    for name in ("eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is None:
            raise StageError(f"{where}: tokenizer has no {name} token; expected one (set {name}_token)")
        model_ids = _as_list(getattr(model.generation_config, f"{name}_token_id", None))
        if not model_ids:
            model_ids = _as_list(getattr(model.config, f"{name}_token_id", None))
        if model_ids and token_id not in model_ids:
            raise StageError(
                f"{where}: tokenizer {name}_token_id is {token_id} but the model's {name}_token_id is "
                f"{model_ids if len(model_ids) > 1 else model_ids[0]}; expected them to be equal"
            )


def tokenizer_signature(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What must agree between stages and evaluation: vocabulary, special tokens and ids, template."""
    vocab = tokenizer.get_vocab()
    return {
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16],
        "eos": [tokenizer.eos_token, tokenizer.eos_token_id],
        "pad": [tokenizer.pad_token, tokenizer.pad_token_id],
        "bos": [tokenizer.bos_token, tokenizer.bos_token_id],
        "special_tokens": sorted(map(str, tokenizer.all_special_tokens)),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def check_same_tokenizer(
    reference: dict[str, Any], other: dict[str, Any], *, reference_where: str, other_where: str
) -> None:
    """StageError naming each differing field with both values (EOS/template drift is silent otherwise)."""
    diffs = [f"{key}: {value!r} vs {other.get(key)!r}" for key, value in reference.items() if value != other.get(key)]
    if diffs:
        raise StageError(
            f"tokenizer of {other_where} differs from that of {reference_where}: {'; '.join(diffs)}; "
            "expected every model of one pipeline to share the tokenizer, special tokens and prompt template"
        )


# from_pretrained options that transformers keeps in a tokenizer's init kwargs and would save with it.
LOAD_TIME_KWARGS = ("local_files_only", "cache_dir", "force_download", "token")


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """save_pretrained (safetensors) + tokenizer + generation_config carrying the EOS and PAD ids.

    `state_dict`: full weights gathered from a sharded run (FSDP / DeepSpeed ZeRO-3); None = the model's own.
    """
    _set_generation_ids(model, tokenizer)
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    # Load-time options are not part of the tokenizer: transformers writes `local_files_only` (true under
    # HF_HUB_OFFLINE=1) into tokenizer_config.json, so the same model would hash differently offline and online.
    for key in LOAD_TIME_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(folder)


def count_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())


def _set_generation_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # Generation stops on EOS and pads with PAD; both must travel with the saved model.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
