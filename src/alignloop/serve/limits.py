"""Limits on what one client may ask: token buckets (requests and generated tokens per user,
failed logins per address), kept in this process or shared by the replicas on one database,
and a body size per request."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Hashable
from typing import Any, Union

from alignloop.errors import ConfigError
from alignloop.feedback.store import FeedbackStore
from alignloop.serve.errors import error_response


class RateLimiter:
    """A token bucket per key (a user, an address): ``burst`` tokens at once, refilled at
    ``per_minute``/60 a second. In memory, per server process; 0 a minute = no limit."""

    shared = False  # a check costs a lock and a dict look-up (0.2 µs): done on the event loop

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


class SharedRateLimiter:
    """:class:`RateLimiter`'s token buckets kept in the feedback database's ``rate_buckets`` table
    (``serve --limits database``), so that every replica on that PostgreSQL draws on one bucket
    per key: a user's budget spent through one replica is spent through all, and a guesser of
    keys is counted across them. ``name`` keeps the buckets of one limit apart from another's.

    A check is one statement on the calling thread's own connection (:meth:`FeedbackStore.
    take_from_bucket`: an upsert that refills and takes under the row's lock, ~85 µs on
    loopback, benchmarks/shared_limits.py), so callers make it off the event loop. Every
    ``SWEEP_EVERY`` takes the buckets that have refilled are dropped (a missing row is a full
    bucket), as the in-memory limiter forgets its full buckets."""

    shared = True
    SWEEP_EVERY = 10_000

    def __init__(self, store: FeedbackStore, name: str, per_minute: float, burst: float) -> None:
        self.store, self.name = store, name
        self.rate, self.burst = per_minute / 60.0, float(burst)
        self._takes = itertools.count(1)

    def retry_after(self, key: Hashable, cost: float = 1.0) -> float | None:
        """As :meth:`RateLimiter.retry_after`, on the shared bucket."""
        if self.rate <= 0:
            return None
        cost = min(cost, self.burst)
        granted, tokens = self.store.take_from_bucket(f"{self.name}:{key}", cost, self.rate, self.burst)
        if next(self._takes) % self.SWEEP_EVERY == 0:
            self.store.sweep_buckets(f"{self.name}:", self.burst / self.rate)
        return None if granted else (cost - tokens) / self.rate

    def wait(self, key: Hashable, cost: float = 1.0) -> float | None:
        """:meth:`retry_after` without taking anything."""
        if self.rate <= 0:
            return None
        cost = min(cost, self.burst)
        tokens = self.store.bucket_tokens(f"{self.name}:{key}", self.rate, self.burst)
        return None if tokens >= cost else (cost - tokens) / self.rate


Limiter = Union[RateLimiter, SharedRateLimiter]


def require_limits_backend(limits: str, backend: str) -> None:
    """Refuse ``--limits database`` on a store other replicas cannot share."""
    if limits == "database" and backend != "postgresql":
        raise ConfigError(f"limits: 'database' shares the counts between server replicas through a PostgreSQL --db; this "
                          f"server's store is {backend}, which one server uses: leave limits at 'memory' (the default), "
                          "or give --db postgresql+psycopg://USER@HOST/DB")


def make_limiter(limits: str, store: FeedbackStore, name: str, per_minute: float, burst: float) -> Limiter:
    """The ``name`` limit (``requests``, ``tokens``, ``logins``) where ``limits`` says it lives."""
    if limits == "memory":
        return RateLimiter(per_minute, burst)
    require_limits_backend(limits, store.backend)
    return SharedRateLimiter(store, name, per_minute, burst)


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
