"""The chat page at ``/``: plain HTML, JS and CSS from ``static/``, no build step."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount_page(app: FastAPI) -> None:
    """Serve ``static/`` at ``/``; mounted last, as a mount at ``/`` answers every path the routes do not."""
    if STATIC.is_dir():
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
