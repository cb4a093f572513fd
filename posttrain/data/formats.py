"""TRL's standard data formats in the pipeline's record schema, and their validation.

Formats a source may give (TRL's names; `columns:` maps a source's own column names onto these fields):

| format | fields |
|---|---|
| language modelling | `text` |
| prompt-only (GRPO, evaluation) | `prompt` + `answer` (+ the domain's verifier) |
| prompt-completion | `prompt` + `completion` |
| conversational | `messages`: a list of `{role, content}`, roles system/user/assistant |
| conversational prompt-completion | `prompt` (messages) + `completion` (messages) |
| conversational prompt-only | `prompt` (messages) + `answer` |
| preference | `prompt` + `chosen` + `rejected` (strings), or conversational: `chosen`/`rejected` as messages, with `prompt` messages or an implicit prompt (the turns the two share) |

How they are stored (every record column is a string, see docs/design.md): a record is
conversational exactly when its `messages` column is non-empty. `messages` then holds the
canonical JSON of the conversation (SFT) or of the prompt turns (every other conversational
format), and `completion`, `chosen`, `rejected` hold canonical JSON message lists. For standard
formats `messages` is empty and `prompt`, `completion`, `chosen`, `rejected` are plain strings.
`text` always holds a plain rendering (`role: content` lines for conversations): it feeds the
n-gram decontamination and a `text` mixture, never training with a chat template.

Stdlib only (imported by posttrain.data.domains, which posttrain.config imports).
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant")
# The record columns this module adds to the original prompt/answer/text/verifier schema.
CONVERSATION_COLUMNS = ("messages", "completion", "chosen", "rejected")
# Fields a source's `columns:` may map (record field -> the source's column).
SOURCE_FIELDS = ("text", "prompt", "answer", "completion", "messages", "chosen", "rejected")
# The field sets a source may provide, most specific first; the first one fully present wins.
SOURCE_MODES: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "conversational": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "prompt_answer": ("prompt", "answer"),
    "text": ("text",),
}
Message = dict[str, str]


class BadRow(Exception):
    """One row that cannot be used (the message names where and which field)."""


def canonical_json(value: Any) -> str:
    """One byte string per value: sorted keys, no spaces, UTF-8 kept (the hashed and stored form)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def render_plain(messages: list[Message]) -> str:
    """`role: content` lines: the text that n-gram decontamination and `text` mixtures see."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def decode_messages(value: str) -> list[Message]:
    """A stored message list back from its canonical JSON (for trainers: TRL wants lists of dicts)."""
    return json.loads(value) if value else []


def trl_row(row: dict[str, str], conversational: bool) -> dict[str, Any]:
    """A mixture row as TRL wants it: in a conversational mixture (manifest `conversational`) the
    message columns decoded from canonical JSON into lists of {role, content}; else unchanged."""
    if not conversational:
        return dict(row)
    return {
        k: decode_messages(v) if k in ("messages", "prompt", "completion", "chosen", "rejected") else v
        for k, v in row.items()
    }


def is_conversational(record: dict[str, str]) -> bool:
    return bool(record.get("messages"))


def chat_fields(prompt: str, answer: str) -> dict[str, str]:
    """The conversational rendering of a prompt/answer item: one user turn, one assistant turn.

    `messages` holds the prompt turn (the record stays a verifiable prompt-only item: `answer` is
    the gold answer) and `completion` the assistant turn, so SFT trains on prompt + completion and
    GRPO/evaluation send the prompt turn through the chat template.
    """
    return {
        "messages": canonical_json([{"content": prompt, "role": "user"}]),
        "completion": canonical_json([{"content": answer, "role": "assistant"}]),
    }


def prompt_turns(record: dict[str, str]) -> list[Message]:
    """The prompt turns of a conversational prompt-only, prompt-completion or preference record."""
    return decode_messages(record["messages"])


def full_conversation(record: dict[str, str]) -> list[Message]:
    """The whole conversation of a conversational record, for SFT on `messages`.

    An SFT conversation is stored whole in `messages`; other records append their completion, the
    preferred answer, or the gold answer as the assistant turn.
    """
    turns = decode_messages(record["messages"])
    for name in ("completion", "chosen"):
        if record.get(name):
            return turns + decode_messages(record[name])
    if record.get("answer"):
        return [*turns, {"content": record["answer"], "role": "assistant"}]
    return turns


# --------------------------------------------------------------------------- validation


def check_messages(value: Any, where: str, field: str, *, allow_empty: bool = False) -> list[Message]:
    """A list of {role, content} with known roles and non-empty string content, normalised to those two keys."""
    label = f"{where}: {field}"
    if isinstance(value, str):
        # CSV and some parquet writers store nested data as a JSON string.
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow(
                f"{label} is a string that is not a JSON list of messages; expected a list of {{role, content}}"
            ) from None
    if not isinstance(value, list):
        raise BadRow(f"{label} is {type(value).__name__}, expected a list of {{role, content}} messages")
    if not value and not allow_empty:
        raise BadRow(f"{label} is an empty list; expected at least one message")
    out: list[Message] = []
    for i, message in enumerate(value):
        at = f"{label} message {i}"
        if not isinstance(message, dict):
            raise BadRow(f"{at} is {type(message).__name__}, expected an object with role and content")
        # Parquet/`datasets` structs give every message every key of the column (None when unused).
        extra = sorted(k for k in set(message) - {"role", "content"} if message[k] is not None)
        if extra:
            raise BadRow(f"{at} has unknown key(s) {extra}; expected only role and content")
        role = message.get("role")
        if role not in ROLES:
            raise BadRow(f"{at}: unknown role {role!r}; expected one of {list(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise BadRow(f"{at} ({role}): content is {type(content).__name__} {content!r}, expected a string")
        if not content.strip():
            raise BadRow(f"{at} ({role}): content is empty; expected text")
        out.append({"content": content, "role": role})
    return out


def _check_completion_turns(messages: list[Message], where: str, field: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise BadRow(
            f"{where}: {field}: the last turn is {messages[-1]['role']!r}; expected 'assistant' "
            "(there is nothing to train on after the last assistant turn)"
        )


def _split_implicit_prompt(chosen: list[Message], rejected: list[Message], where: str) -> list[Message]:
    """The shared prompt of full chosen/rejected conversations: every turn before the last one."""
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=False)):
        if a != b:
            raise BadRow(
                f"{where}: fields 'chosen'/'rejected': the prompt differs at turn {i} "
                f"({a['role']}: {a['content'][:40]!r} vs {b['role']}: {b['content'][:40]!r}); "
                "expected both to share every turn but the final assistant turn"
            )
    if len(chosen) != len(rejected):
        raise BadRow(
            f"{where}: fields 'chosen'/'rejected': the prompt differs ({len(chosen) - 1} vs {len(rejected) - 1} "
            "prompt turns); expected both to share every turn but the final assistant turn"
        )
    return chosen[:-1]


def _string(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"{where}: {field} is {type(value).__name__} {value!r}, expected a string")
    if not value.strip():
        raise BadRow(f"{where}: {field} is an empty string")
    return value


def _text_or_messages(value: Any, where: str, field: str) -> str | list[Message]:
    """A standard field (a plain string) or a conversational one (a list of messages)."""
    if isinstance(value, list):
        return check_messages(value, where, field)
    return _string(value, where, field)


def parse_row(values: dict[str, Any], mode: str, where: str, columns: dict[str, str] | None = None) -> dict[str, str]:
    """Validated record fields (keyword arguments of make_record, minus domain/verifier) of one row.

    `values` maps record fields to the row's values (nulls already refused by the caller); `mode`
    is a key of SOURCE_MODES; `columns` (field -> source column) names the column in errors.
    Raises BadRow naming `where` and the field.
    """
    columns = columns or {}

    def f(name: str) -> str:
        column = columns.get(name, name)
        return f"field '{name}'" + (f" (column '{column}')" if name in columns else "")

    if mode == "text":
        return {"text": _string(values["text"], where, f("text"))}
    if mode == "conversational":
        messages = check_messages(values["messages"], where, f("messages"))
        _check_completion_turns(messages, where, f("messages"))
        return {"messages": canonical_json(messages), "text": render_plain(messages)}
    if mode == "prompt_answer":
        prompt = _text_or_messages(values["prompt"], where, f("prompt"))
        answer = _string(values["answer"], where, f("answer"))
        if isinstance(prompt, str):
            return {"prompt": prompt, "answer": answer}
        return {"messages": canonical_json(prompt), "answer": answer, "text": render_plain(prompt) + "\n" + answer}
    if mode == "prompt_completion":
        prompt = _text_or_messages(values["prompt"], where, f("prompt"))
        completion = _text_or_messages(values["completion"], where, f("completion"))
        if isinstance(prompt, str) != isinstance(completion, str):
            raise BadRow(
                f"{where}: fields 'prompt'/'completion': one is a string and one is messages; expected both alike"
            )
        if isinstance(prompt, str):
            return {"prompt": prompt, "completion": completion, "text": prompt + completion}
        _check_completion_turns(completion, where, f("completion"))
        return {
            "messages": canonical_json(prompt),
            "completion": canonical_json(completion),
            "text": render_plain(prompt + completion),
        }
    if mode in ("preference", "implicit_preference"):
        chosen = _text_or_messages(values["chosen"], where, f("chosen"))
        rejected = _text_or_messages(values["rejected"], where, f("rejected"))
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise BadRow(
                f"{where}: fields 'chosen'/'rejected': one is a string and one is messages; expected both alike"
            )
        if chosen == rejected:
            raise BadRow(
                f"{where}: fields 'chosen'/'rejected' are equal; expected a preferred and a different rejected answer"
            )
        if mode == "implicit_preference":
            if isinstance(chosen, str):
                raise BadRow(f"{where}: field 'prompt' is missing; standard (string) preference pairs need a prompt")
            _check_completion_turns(chosen, where, f("chosen"))
            _check_completion_turns(rejected, where, f("rejected"))
            prompt_turns = _split_implicit_prompt(chosen, rejected, where)
            if not prompt_turns:
                raise BadRow(
                    f"{where}: fields 'chosen'/'rejected' hold no prompt turns; expected the shared prompt before the answer"
                )
            chosen, rejected = chosen[len(prompt_turns) :], rejected[len(prompt_turns) :]
            prompt: str | list[Message] = prompt_turns
        else:
            prompt = _text_or_messages(values["prompt"], where, f("prompt"))
        if isinstance(chosen, str):
            if not isinstance(prompt, str):
                raise BadRow(
                    f"{where}: field 'prompt' is messages but chosen/rejected are strings; expected both alike"
                )
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "text": prompt + chosen}
        if isinstance(prompt, str):
            prompt = [{"content": prompt, "role": "user"}]
        _check_completion_turns(chosen, where, f("chosen"))
        _check_completion_turns(rejected, where, f("rejected"))
        return {
            "messages": canonical_json(prompt),
            "chosen": canonical_json(chosen),
            "rejected": canonical_json(rejected),
            "text": render_plain(prompt + chosen),
        }
    raise ValueError(f"unknown source mode {mode!r}; expected one of {list(SOURCE_MODES)}")


def resolve_mode(columns: dict[str, str], available: list[str] | None, where: str) -> tuple[str, dict[str, str]]:
    """(mode, record field -> source column) for a source with `available` columns.

    Mapped fields (`columns:`) count as present; unmapped fields use their own name. The first
    mode of SOURCE_MODES whose fields are all present wins.
    """
    present = set(available or ())
    mapped = {field: columns.get(field, field) for field in SOURCE_FIELDS}
    have = {field for field, column in mapped.items() if field in columns or column in present}
    for mode, fields in SOURCE_MODES.items():
        if set(fields) <= have:
            return mode, {field: mapped[field] for field in fields}
    if columns:
        # The user named fields: say which ones are still needed for the closest format.
        need = {mode: sorted(set(fields) - have) for mode, fields in SOURCE_MODES.items() if set(fields) & set(columns)}
        detail = "; ".join(f"{mode} also needs {missing}" for mode, missing in need.items())
        raise BadSource(f"{where}: `columns:` maps {sorted(columns)} but no format is complete ({detail})")
    formats = ", ".join("+".join(fields) for fields in SOURCE_MODES.values())
    raise BadSource(
        f"{where}: found no known format in columns {sorted(present)}; expected one of: {formats}, "
        "or set `columns:` to map record fields onto your columns"
    )


class BadSource(Exception):
    """The whole source is unusable (no recognisable format): always fatal."""
