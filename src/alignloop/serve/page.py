"""The chat page at ``/``: plain HTML, JS and CSS from ``static/``, no build step; and the
headers that keep a browser from running anything else in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

# The page loads its own script and style sheet and talks to its own origin, nothing else: a
# text that slipped past the page's escaping still could not load or run a script.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
EVERY_RESPONSE = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]
DOCS = ("/docs", "/redoc")  # FastAPI's documentation pages load Swagger UI and ReDoc from a CDN, with inline scripts


def mount_page(app: FastAPI) -> None:
    """Serve ``static/`` at ``/``; mounted last, as a mount at ``/`` answers every path the routes do not."""
    if STATIC.is_dir():
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")


class SecurityHeaders:
    """ASGI middleware: ``nosniff``, no framing and no referrer on every response; the page's
    Content-Security-Policy on all but the documentation pages."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = EVERY_RESPONSE if scope["path"].startswith(DOCS) else [*EVERY_RESPONSE, (b"content-security-policy", PAGE_POLICY.encode())]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
