"""Limits on what one client may ask: a request rate per user and a body size per request."""

from __future__ import annotations

import threading
import time
from typing import Any

from alignloop.serve.errors import error_response


class RateLimiter:
    """A token bucket per user: ``burst`` requests at once, refilled at ``per_minute``/60 a second.
    In memory, per server process."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate, self.burst = per_minute / 60.0, burst
        self.buckets: dict[int, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def retry_after(self, user_id: int) -> float | None:
        """None if the request may go ahead (and take a token), else the seconds until it may."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(user_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self.buckets[user_id] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self.buckets[user_id] = (tokens - 1.0, now)
            return None


class BodySizeLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by its Content-Length or, for a
    chunked body, as soon as the bytes read pass it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(scope, receive, send)
        seen = 0

        async def counting_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        response = error_response(413, f"request body is over the server's limit of {self.limit} bytes", "invalid_request_error")
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass
