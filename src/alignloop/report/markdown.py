"""Markdown pieces of every report.md: safe table cells, numbers as cells, tables, image links."""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from alignloop.report.stats import is_number


def md_cell(text: str, limit: int = 400) -> str:
    """Free text made safe for one markdown table cell: HTML escaped, pipes escaped, newlines as <br>.

    Cut at ``limit`` characters: a sample table is for a glance, not for reading whole completions.
    """
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "…"
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def number_cell(value, float_format: str = ".4g") -> str:
    """A metric as a table cell: None as n/a, ints with thousands separators, floats by ``float_format``,
    a list as ``[a, b]`` (an interval), anything else (a string, a bool) as escaped text."""
    if value is None:
        return "n/a"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(number_cell(v, float_format) for v in value) + "]"
    if not is_number(value):
        return md_cell(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:{float_format}}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table as lines: the header, its ``---`` rule, then one line per row of formatted cells."""
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def markdown_images(folder: Path, plots: dict[str, Path]) -> list[str]:
    """``![alt](path)`` lines, paths relative to the report's folder so the folder can be moved."""
    return [f"![{alt}]({Path(os.path.relpath(path, folder)).as_posix()})\n" for alt, path in plots.items()]
