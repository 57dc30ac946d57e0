"""Converters for human-preference files people already have, into TRL's preference records.

* Anthropic HH-RLHF (``hh-rlhf:PATH``): JSONL, plain or ``.gz``, one ``{"chosen", "rejected"}``
  pair of whole transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) per line. Becomes a
  conversational record: ``prompt`` = the turns both transcripts share, ``chosen``/``rejected`` =
  the rest of each (usually the one final assistant reply).
* UKPConvArg1Strict CSVs (``ukp:PATH``): tab-separated, one file per debate side, ``#id label a1
  a2``. Becomes a plain-text record: ``prompt`` names the debate and stance, ``chosen``/
  ``rejected`` are the two arguments, ordered by ``label``.

Each row keeps its place (``file:line``) so that later validation errors still point at the
original file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from alignloop.data.records import Row
from alignloop.errors import DataError

log = logging.getLogger("alignloop")

# A turn starts at the beginning of the transcript or after a blank line. "Human:" inside a turn
# (an artifact in a few hh-rlhf transcripts: "Assistant: Human: ...") stays part of that turn.
HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class HHCounts:
    """What happened to the pairs of an hh-rlhf file."""

    pairs: int  # lines read
    kept: int  # records returned
    diverged: int  # kept: the transcripts differ before their last turn (prompt = the shared turns)
    empty_reply: int  # kept: the chosen or rejected final reply is empty
    identical: int  # dropped: chosen == rejected, nothing to learn
    no_shared_prompt: int  # dropped: the transcripts differ from their first turn


def convert_hh_rlhf(raw_rows: Iterable[Row]) -> tuple[list[Row], HHCounts]:
    """Turn raw ``{"chosen": transcript, "rejected": transcript}`` rows into preference records.

    ``prompt`` is the longest run of turns both transcripts share (never all of either, so both
    sides keep at least one message); ``chosen`` and ``rejected`` are the remaining turns of each.
    In nearly every pair that is the whole dialogue but the last reply, and each side is one
    assistant message. Where the transcripts diverge earlier (5 of 2,312 pairs in harmless-base
    test, all with two Assistant turns in a row on one side) a side holds several messages, in
    general possibly user turns too: the annotator compared those whole continuations. Empty final replies (4 in that file) are kept as messages with
    empty content: a reward model can score them, and the annotators did prefer or reject them.
    Pairs whose two sides are identical, or that share no turn to use as a prompt, are dropped
    and counted.
    """
    rows = []
    pairs = diverged = empty_reply = identical = no_shared_prompt = 0
    for raw in raw_rows:
        pairs += 1
        chosen = _hh_messages(raw, "chosen")
        rejected = _hh_messages(raw, "rejected")
        if chosen == rejected:
            identical += 1
            continue
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            no_shared_prompt += 1
            continue
        if chosen[:-1] != rejected[:-1]:
            diverged += 1
        if not chosen[-1]["content"] or not rejected[-1]["content"]:
            empty_reply += 1
        fields = {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
        rows.append(Row(fields, raw.where))
    counts = HHCounts(pairs, len(rows), diverged, empty_reply, identical, no_shared_prompt)
    return rows, counts


def _hh_messages(raw: Row, name: str) -> list[dict[str, str]]:
    """The turns of transcript ``raw.fields[name]`` as chat messages with stripped content."""
    text = raw.fields.get(name)
    if text is None:
        raise DataError(f"{raw.where}: field '{name}' missing; an hh-rlhf line needs chosen and rejected transcripts")
    if not isinstance(text, str):
        raise DataError(f"{raw.where}: field '{name}' must be a transcript string, got {type(text).__name__}")
    parts = HH_TURN.split(text)  # [before, role, content, role, content, ...]
    if parts[0].strip() or len(parts) < 3:
        raise DataError(
            f"{raw.where}: field '{name}' is not an hh-rlhf transcript (\"\\n\\nHuman: ...\\n\\nAssistant: ...\")"
        )
    turns = zip(parts[1::2], parts[2::2])
    messages = [{"role": HH_ROLES[role], "content": content.strip()} for role, content in turns]
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{raw.where}: field '{name}' ends with a Human turn; the last must be the Assistant's reply")
    return messages


def read_ukp_convarg(path: str | Path) -> list[Row]:
    """Plain-text preference records from UKPConvArg1Strict CSVs: a folder of them, or one file.

    Each ``<debate>_<stance>.csv`` (tab-separated, unquoted, header line starting with ``#``)
    holds pairs of arguments for one side of a debate; ``label`` names the more convincing one.
    A record is ``prompt`` = ``"Debate: <debate>\\nStance: <stance>\\n\\n"`` (the file name's
    words; it ends with a blank line because standard records are joined as prompt + argument),
    ``chosen``/``rejected`` = the two arguments with ``<br/>`` as newlines, plus ``group`` (the
    debate slug, shared by both stances: split on it to hold out whole topics), ``stance`` (the
    stance slug) and ``id`` (the file's ``#id``).
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.csv"))
        if not files:
            raise DataError(f"{p}: no .csv files here; expected UKPConvArg1Strict files <debate>_<stance>.csv")
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{p}: data file not found")
    return [row for file in files for row in _read_ukp_file(file)]


def _read_ukp_file(path: Path) -> list[Row]:
    debate, sep, stance = path.stem.partition("_")
    if not sep:
        raise DataError(f"{path}: a UKPConvArg1 file is named <debate>_<stance>.csv; this name has no '_'")
    prompt = f"Debate: {_words(debate)}\nStance: {_words(stance)}\n\n"
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if lineno == 1 and line.startswith("#"):
                continue  # header: #id label a1 a2
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) != 4:
                raise DataError(f"{path}:{lineno}: {len(cells)} tab-separated columns; expected 4 (#id, label, a1, a2)")
            pair_id, label, a1, a2 = cells
            if label not in ("a1", "a2"):
                raise DataError(f"{path}:{lineno}: field 'label' is {label!r}; expected a1 or a2")
            arguments = {"a1": _argument(a1), "a2": _argument(a2)}
            fields = {
                "prompt": prompt,
                "chosen": arguments[label],
                "rejected": arguments["a2" if label == "a1" else "a1"],
                "group": debate,
                "stance": stance,
                "id": pair_id,
            }
            rows.append(Row(fields, f"{path}:{lineno}"))
    return rows


def _words(slug: str) -> str:
    """``"christianity-or-atheism-"`` -> ``"christianity or atheism"``."""
    return " ".join(slug.replace("-", " ").split())


def _argument(cell: str) -> str:
    return cell.replace("<br/>", "\n").strip()


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path, private: bool = False) -> None:
    """Write each record as one JSON line (UTF-8, non-ASCII kept as is; other values as text),
    to a temporary file renamed into place: a kill mid-write leaves the previous file whole.
    ``private``: the file is readable by its owner only (0600), for what people wrote."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    if private:
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # created 0600 before any byte is in it
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, p)

