"""Limits on what one client may ask: token buckets (requests and generated tokens per user,
failed logins per address) and a body size per request."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any

from alignloop.serve.errors import error_response


class RateLimiter:
    """A token bucket per key (a user, an address): ``burst`` tokens at once, refilled at
    ``per_minute``/60 a second. In memory, per server process; 0 a minute = no limit."""

    def __init__(self, per_minute: float, burst: float) -> None:
        self.rate, self.burst = per_minute / 60.0, float(burst)
        self.buckets: dict[Hashable, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def retry_after(self, key: Hashable, cost: float = 1.0) -> float | None:
        """None if ``cost`` tokens were there (and are now taken), else the seconds until they
        will be (nothing taken). A cost above the burst is charged as the whole burst."""
        return self._take(key, cost, take=True)

    def wait(self, key: Hashable, cost: float = 1.0) -> float | None:
        """:meth:`retry_after` without taking anything."""
        return self._take(key, cost, take=False)

    def _take(self, key: Hashable, cost: float, take: bool) -> float | None:
        if self.rate <= 0:
            return None
        cost = min(cost, self.burst)
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < cost:
                self.buckets[key] = (tokens, now)
                return (cost - tokens) / self.rate
            self.buckets[key] = (tokens - cost if take else tokens, now)
            if len(self.buckets) > 100_000:  # many addresses: forget the full buckets (a full bucket is the default)
                self.buckets = {k: v for k, v in self.buckets.items() if v[0] < self.burst}
            return None


class BodySizeLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by its Content-Length or, for a
    chunked body (no Content-Length), by reading it first: it is read into memory up to the limit
    and handed on whole (every route parses whole JSON bodies anyway), so an overflow is a 413
    before the route starts, not a parse error inside it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await self._too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):  # no body expected: nothing to read first
            return await self.app(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return await self._too_large(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole, delivered = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        response = error_response(413, f"request body is over the server's limit of {self.limit} bytes", "invalid_request_error")
        await response(scope, receive, send)
