"""Record kinds, in TRL's field names, and their validation.

Every loader yields :class:`Row` objects that remember where they came from, so each error can
name the file, the line (or row) and the field.

| kind              | fields                                                    |
| ----------------- | --------------------------------------------------------- |
| text              | text                                                      |
| prompt_completion | prompt, completion (strings, or lists of chat messages)   |
| chat              | messages: [{"role": ..., "content": ...}, ...]            |
| preference        | prompt, chosen, rejected                                  |
| binary            | prompt, completion, label (true = good)                   |
| rating            | prompt, completion, rating (a number)                     |
| prompt            | prompt, plus any fields a reward function reads           |
| labelled          | text, label (a class name or id; sentiment and the like)  |
| tagged            | tokens, tags (one BIO tag per token; NER)                 |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from alignloop.errors import DataError

ROLES = ("system", "user", "assistant", "tool")

# Required fields per kind, in detection order: the first kind whose fields are all present wins,
# so the more specific kinds come first.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "binary": ("prompt", "completion", "label"),
    "rating": ("prompt", "completion", "rating"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "tagged": ("tokens", "tags"),
    "labelled": ("text", "label"),
    "text": ("text",),
    "prompt": ("prompt",),
}

KIND_NAMES = {
    "preference": "a preference record",
    "binary": "a thumbs record",
    "rating": "a rating record",
    "prompt_completion": "a prompt→completion record",
    "chat": "a chat record",
    "text": "a text record",
    "prompt": "a prompt record",
    "labelled": "a labelled text record",
    "tagged": "a tagged tokens record",
}


@dataclass(frozen=True)
class Row:
    """One record and the place it was read from (``data/sft.jsonl:17``)."""

    fields: dict[str, Any]
    where: str


def detect_kind(row: Row, accepted: Iterable[str]) -> str:
    """The kind of ``row`` among ``accepted`` kinds, or a DataError saying which fields are needed."""
    accepted = tuple(accepted)
    for kind, required in KIND_FIELDS.items():
        if kind in accepted and all(name in row.fields for name in required):
            return kind
    wanted = " or ".join(f"{{{', '.join(KIND_FIELDS[k])}}}" for k in accepted)
    present = ", ".join(sorted(row.fields)) or "none"
    raise DataError(f"{row.where}: this stage needs records with fields {wanted}; found fields: {present}")


def validate_rows(rows: list[Row], accepted: Iterable[str], source: str) -> str:
    """Check every row against the kind of the first; return that kind."""
    if not rows:
        raise DataError(f"{source}: no records (the dataset is empty)")
    kind = detect_kind(rows[0], accepted)
    for row in rows:
        validate_row(row, kind)
    return kind


def validate_row(row: Row, kind: str) -> None:
    """Raise DataError naming ``row.where`` and the field if ``row`` is not a valid ``kind`` record."""
    required = KIND_FIELDS[kind]
    for name in required:
        if name not in row.fields or row.fields[name] is None:
            raise DataError(f"{row.where}: field '{name}' missing; {KIND_NAMES[kind]} needs {', '.join(required)}")
    f = row.fields
    if kind == "text":
        _check_str(row, "text")
    elif kind == "labelled":
        _check_str(row, "text")
        if not isinstance(f["label"], (str, int)) or isinstance(f["label"], bool) or f["label"] == "":
            raise DataError(f"{row.where}: field 'label' must be a class name or an integer id, got {f['label']!r}")
    elif kind == "tagged":
        for name in ("tokens", "tags"):
            if not isinstance(f[name], list) or not f[name] or not all(isinstance(x, str) and x for x in f[name]):
                raise DataError(f"{row.where}: field '{name}' must be a non-empty list of non-empty strings")
        if len(f["tokens"]) != len(f["tags"]):
            raise DataError(f"{row.where}: {len(f['tokens'])} tokens but {len(f['tags'])} tags; give one tag per token")
    elif kind == "chat":
        _check_messages(row, "messages", f["messages"])
        if not any(m["role"] == "assistant" for m in f["messages"]):
            raise DataError(f"{row.where}: field 'messages' has no assistant message to learn from")
    else:
        _check_text_or_messages(row, "prompt")
        for name in ("completion", "chosen", "rejected"):
            if name in required:
                _check_text_or_messages(row, name)
                if isinstance(f[name], str) and not f[name].strip():
                    # A blank CSV cell reads as "": it would train on EOS alone.
                    raise DataError(f"{row.where}: field '{name}' is empty; {KIND_NAMES[kind]} needs its text")
                if isinstance(f["prompt"], str) != isinstance(f[name], str):
                    raise DataError(
                        f"{row.where}: fields 'prompt' and '{name}' must both be strings or both be message lists"
                    )
        if kind == "binary":
            label = f["label"]
            if isinstance(label, str) and label.lower() in ("true", "false", "1", "0"):
                f["label"] = label.lower() in ("true", "1")
            elif isinstance(label, int) and label in (0, 1):
                f["label"] = bool(label)
            elif not isinstance(label, bool):
                raise DataError(f"{row.where}: field 'label' must be true or false, got {label!r}")
        if kind == "rating":
            try:
                f["rating"] = float(f["rating"])
            except (TypeError, ValueError):
                raise DataError(f"{row.where}: field 'rating' must be a number, got {f['rating']!r}") from None


def identical_pair_problem(row: Row) -> str | None:
    """The message for a preference row whose chosen equals its rejected (it teaches nothing and
    its loss is constant), or None."""
    if row.fields["chosen"] == row.fields["rejected"]:
        return f"{row.where}: fields 'chosen' and 'rejected' are identical; a preference needs two different responses"
    return None


def _check_str(row: Row, name: str) -> None:
    value = row.fields[name]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{row.where}: field '{name}' is empty")


def _check_text_or_messages(row: Row, name: str) -> None:
    value = row.fields[name]
    if isinstance(value, str):
        return
    if isinstance(value, list):
        _check_messages(row, name, value)
        return
    raise DataError(f"{row.where}: field '{name}' must be a string or a list of messages, got {type(value).__name__}")


def _check_messages(row: Row, name: str, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.where}: field '{name}' must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{row.where}: field '{name}[{i}]' must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{row.where}: field '{name}[{i}].role' is {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{row.where}: field '{name}[{i}].content' must be a string")
