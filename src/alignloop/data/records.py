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
| bandit            | shown, propensity, reward; with text (a classification)   |
|                   | or tokens, start, end (one NER entity); label optional    |

A ``bandit`` record is one prediction a user judged: ``shown`` the output they saw (a class name, or
for NER an entity type on words ``tokens[start:end]``), ``propensity`` the probability with which
the serving policy chose it (in (0, 1]), ``reward`` the verdict (1 correct, 0 wrong, or a number in
between) and, when the user named it, ``label`` the right class (NER: the right type, or "O" for
"not an entity").
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
    # before tagged and labelled: a bandit row may carry a text and a label, or tokens
    "bandit": ("shown", "propensity", "reward"),
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
    "bandit": "a bandit feedback record",
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
    elif kind == "bandit":
        _check_bandit(row)
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


def _check_bandit(row: Row) -> None:
    """A bandit row: the shown output, its propensity and the verdict, on a text or on an entity
    span of words. CSV cells arrive as strings: numbers are converted in place."""
    f = row.fields
    _check_class(row, "shown")
    if f.get("label") is not None:
        _check_class(row, "label")
    f["propensity"] = _number(row, "propensity")
    if not 0 < f["propensity"] <= 1:
        # 0 would be an infinite importance weight: the output could not have been shown
        raise DataError(f"{row.where}: field 'propensity' is {f['propensity']:g}; a probability in (0, 1] "
                        "(the chance the server had of showing this output)")
    reward = f["reward"]
    if isinstance(reward, str) and reward.lower() in ("true", "false"):
        reward = reward.lower() == "true"
    f["reward"] = float(reward) if isinstance(reward, bool) else _number(row, "reward")
    if not 0 <= f["reward"] <= 1:
        raise DataError(f"{row.where}: field 'reward' is {f['reward']:g}; 1 (correct), 0 (wrong) or a number in between")
    if f.get("text") is not None:
        _check_str(row, "text")
        return
    if f.get("tokens") is None:
        raise DataError(f"{row.where}: field 'text' missing; a bandit feedback record needs text (classification) "
                        "or tokens, start, end (one NER entity)")
    tokens = f["tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise DataError(f"{row.where}: field 'tokens' must be a non-empty list of non-empty strings")
    for name in ("start", "end"):
        if f.get(name) is None:
            raise DataError(f"{row.where}: field '{name}' missing; an NER bandit record needs tokens, start, end "
                            "(the entity's words, end exclusive)")
        value = f[name]
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(f"{row.where}: field '{name}' must be a word index (an integer), got {f[name]!r}")
        f[name] = value
    if not 0 <= f["start"] < f["end"] <= len(tokens):
        raise DataError(f"{row.where}: field 'end' is {f['end']} with start {f['start']}; need 0 ≤ start < end ≤ "
                        f"{len(tokens)} (the number of tokens)")


def _check_class(row: Row, name: str) -> None:
    value = row.fields[name]
    if not isinstance(value, (str, int)) or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{row.where}: field '{name}' must be a class name or an integer id, got {value!r}")


def _number(row: Row, name: str) -> float:
    value = row.fields[name]
    if isinstance(value, bool):
        raise DataError(f"{row.where}: field '{name}' must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{row.where}: field '{name}' must be a number, got {value!r}") from None
    if number != number:  # NaN passes every range check
        raise DataError(f"{row.where}: field '{name}' is NaN; it must be a number")
    return number


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
