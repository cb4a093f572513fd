"""One chat template per pipeline: choosing it, installing it on a tokenizer, fingerprinting it.

`model.chat_template` in params.yaml chooses the template:

- `base`: the base model's own template (its tokenizer's `chat_template`);
- `chatml`: the built-in ChatML template below (`<|im_start|>role\\n...<|im_end|>\\n`);
- any other value: a path to a Jinja file (relative to the project root).

The built-in template wraps each assistant turn's content and its `<|im_end|>` in
`{% generation %}` ... `{% endgeneration %}`, so `apply_chat_template(...,
return_assistant_tokens_mask=True)` marks exactly the tokens the model must produce, end-of-turn
included: TRL's `SFTConfig(assistant_only_loss=True)` needs those markers (TRL 1.16 swaps in its
own training template only for model families it knows, and warns when the end-of-turn token is
outside the mask, since the model then never learns to stop).

On a tokenizer that adds a BOS on encode (Llama 2/3, Mistral, Gemma; posttrain.models.encoding),
the installed template starts with `{{- bos_token -}}` unless it renders the BOS already: TRL's SFT
tokenizes conversations with `apply_chat_template(tokenize=True)`, which adds no special tokens, so
without it every SFT example would lack the BOS the model was pretrained with (issue 26: exact match
stayed at 0 and general-chat perplexity near 8,000). Tokenizers that add none (GPT-2, Qwen2, SmolLM2)
get the template unchanged.

The fingerprint (sha256 of the template text and the ids of the tokenizer's special tokens) goes
into lineage; every stage that consumes a model checks it against its parent's with
`check_same_template`, so a model trained with one template is never served or scored with another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import ParamsError
from posttrain.errors import StageError
from posttrain.models.encoding import bos_id

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"

# ChatML with generation markers; whitespace control keeps it on one line of output per turn.
CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

BUILTIN: dict[str, tuple[str, tuple[str, ...], str]] = {
    # name: (template, special tokens it needs, end-of-turn token = EOS for chat generation)
    "chatml": (CHATML, (CHATML_START, CHATML_END), CHATML_END),
}

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str) -> bool:
    """Whether assistant-only loss can work with this template (same test as TRL's)."""
    return _GENERATION.search(template) is not None


def template_text(choice: str, tokenizer: PreTrainedTokenizerBase | None, root: Path) -> str:
    """The Jinja text of `model.chat_template` = `choice` ('base', a built-in name, or a file path)."""
    if choice == "base":
        template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if not template:
            raise ParamsError(
                "model.chat_template = 'base': the base model's tokenizer has no chat template; "
                f"expected one of {sorted(BUILTIN)} or a path to a Jinja file"
            )
        return template if isinstance(template, str) else template["default"]
    if choice in BUILTIN:
        return BUILTIN[choice][0]
    path = Path(choice) if Path(choice).is_absolute() else root / choice
    if not path.is_file():
        raise ParamsError(
            f"model.chat_template = {choice!r}: no such file ({path}); expected 'base', one of {sorted(BUILTIN)}, "
            "or a path to a Jinja file"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ParamsError(f"model.chat_template = {choice!r}: {path} is not UTF-8 text") from None


def special_tokens_of(choice: str) -> tuple[str, ...]:
    """Special tokens a built-in template needs in the vocabulary (a scratch tokenizer trains them in)."""
    return BUILTIN[choice][1] if choice in BUILTIN else ()


def install(tokenizer: PreTrainedTokenizerBase, choice: str, root: Path) -> int:
    """Put the chosen template on `tokenizer`, adding the special tokens it needs.

    Returns how many tokens were added: a model built before this call must then resize its
    embeddings (`model.resize_token_embeddings(len(tokenizer))`). For a built-in template the EOS
    becomes its end-of-turn token, so generation stops at the end of the assistant's turn.
    """
    text = template_text(choice, tokenizer, root)
    needed = [t for t in special_tokens_of(choice) if t not in tokenizer.get_vocab()]
    added = tokenizer.add_special_tokens({"additional_special_tokens": needed}) if needed else 0
    tokenizer.chat_template = with_bos(tokenizer, text, choice)
    if choice in BUILTIN:
        tokenizer.eos_token = BUILTIN[choice][2]
    return added


BOS_PREFIX = "{{- bos_token -}}"
_PROBE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def with_bos(tokenizer: PreTrainedTokenizerBase, text: str, choice: str) -> str:
    """`text`, starting with the tokenizer's BOS where the tokenizer adds one on encode and the template
    does not render it already (a model's own template usually does: Llama 3's `{{ bos_token }}`)."""
    if bos_id(tokenizer) is None:
        return text
    tokenizer.chat_template = text
    rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    if rendered.startswith(tokenizer.bos_token):
        return text
    if choice not in BUILTIN:
        log.warning(
            "model.chat_template = %r renders no %s, but the tokenizer puts it in front of every text; "
            "the template is installed with %s in front",
            choice,
            tokenizer.bos_token,
            BOS_PREFIX,
        )
    return BOS_PREFIX + text


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's chat template and its special tokens with their ids ('' = no template)."""
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    special = {str(t): tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    payload = json.dumps({"template": template, "special_tokens": special}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# The lineage.json key (and parent-entry key, MLflow tag, model-card line) that carries a fingerprint.
LINEAGE_KEY = "chat_template_fingerprint"


def check_against_lineage(tokenizer: PreTrainedTokenizerBase, lineage: dict[str, Any] | None, where: str) -> str:
    """The tokenizer's fingerprint, refused unless it equals the one its folder's lineage records and
    the one recorded for every parent (a stage boundary: one template for the whole pipeline)."""
    found = fingerprint(tokenizer)
    if not lineage:
        return found
    recorded = lineage.get(LINEAGE_KEY)
    if recorded is not None:
        check_same_template(found, recorded, child_name=f"{where} (its tokenizer)", parent_name=f"{where}/lineage.json")
    for parent in lineage.get("parents") or []:
        if parent.get(LINEAGE_KEY) is not None:
            check_same_template(found, parent[LINEAGE_KEY], child_name=where, parent_name=str(parent.get("path")))
    return found


def folder_fingerprint(model_dir: Path) -> str:
    """The fingerprint of the tokenizer saved in a model folder."""
    from transformers import AutoTokenizer

    return fingerprint(AutoTokenizer.from_pretrained(model_dir))


def check_folders(child_dir: Path, parent_dir: Path) -> str:
    """Refuse `child_dir` unless its template fingerprint equals `parent_dir`'s; returns the fingerprint."""
    child, parent = folder_fingerprint(child_dir), folder_fingerprint(parent_dir)
    check_same_template(child, parent, child_name=str(child_dir), parent_name=str(parent_dir))
    return child


def check_same_template(child: str, parent: str, *, child_name: str, parent_name: str) -> None:
    """Refuse a model whose chat-template fingerprint differs from its parent's, naming both."""
    if child != parent:
        raise StageError(
            f"chat template mismatch: {child_name} has fingerprint {child[:16]}… but its parent {parent_name} "
            f"has {parent[:16]}…; expected one template for the whole pipeline (model.chat_template)"
        )
