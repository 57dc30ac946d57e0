"""A loop folder's files: each iteration's ``state.json`` (the steps done, in :data:`STEPS`
order, with their results) and the JSON files the steps write (JSONL datasets go through
:func:`alignloop.data.convert.write_jsonl`). Writes go to a temporary file and are renamed, so a
kill mid-write leaves the previous file whole."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STEPS = ("collect", "export", "train", "evaluate", "register", "promote")  # one iteration, in order


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, value: Any) -> None:
    """Write, then rename: a kill mid-write leaves the previous file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def iterations(folder: Path) -> list[dict]:
    """Each iteration's state, in order, as far as it got."""
    found = sorted(folder.glob("iter-*/state.json"), key=lambda p: int(p.parent.name.removeprefix("iter-")))
    return [{"iteration": int(p.parent.name.removeprefix("iter-")), **read_json(p)} for p in found]
