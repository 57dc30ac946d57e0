#!/usr/bin/env python
"""What a shared rate limit costs: one token-bucket check in memory (``serve --limits memory``,
the default), in PostgreSQL (``--limits database``: one upsert on the unlogged ``rate_buckets``
table) and, for comparison, in Redis (the same bucket as a Lua script, one EVALSHA through
redis-py; not an alignloop option), then a whole authenticated request with each of alignloop's two.

The work: ``--checks`` takes of 1 token from a bucket that never runs dry, from 1 thread (the
latency of one check: median and p99) and from 8 threads on the same key (checks/s: the row's
lock serialises them); then ``--requests`` ``GET /v1/me`` through FastAPI's TestClient against a
server with each setting, alternating (median per request; with ``database`` a request makes two statements,
the address's failed-login read and the user's request-rate take, in one trip to a worker thread,
besides the key read both settings make).

    .venv/bin/python benchmarks/shared_limits.py
    .venv/bin/python benchmarks/shared_limits.py --redis none --checks 20000

PostgreSQL: $ALIGNLOOP_TEST_PG or --pg (default postgresql+psycopg://postgres@127.0.0.1:5432/test),
in a fresh schema dropped afterwards. Redis: --redis (default redis://127.0.0.1:6379/0), skipped
when the ``redis`` package is not installed or none answers.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import threading
import time
import uuid
from contextlib import ExitStack
from typing import Callable

from alignloop.feedback.database import scratch_postgres_schema
from alignloop.feedback.store import FeedbackStore, upgrade
from alignloop.serve.limits import RateLimiter, SharedRateLimiter

# The bucket of SharedRateLimiter (store.take_from_bucket) in Lua, on Redis's clock.
REDIS_TAKE = """
local now = redis.call('TIME'); now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local burst, rate, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = math.min(burst, (tonumber(b[1]) or burst) + math.max(0, now - (tonumber(b[2]) or now)) * rate)
local granted = 0
if tokens >= cost then tokens = tokens - cost; granted = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000))
return {granted, tostring(tokens)}
"""

BURST, PER_MINUTE = 1e12, 60.0  # never runs dry: every check takes


def latency_us(check: Callable[[], object], n: int) -> tuple[float, float]:
    """Median and p99 of one check, µs (after 200 warm-up calls)."""
    for _ in range(200):
        check()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        check()
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times) * 1e6, times[int(0.99 * (len(times) - 1))] * 1e6


def per_second(make_check: Callable[[], Callable[[], object]], n: int, threads: int = 8) -> float:
    """Checks a second from ``threads`` threads, each with its own check (its own connection)."""
    checks = [make_check() for _ in range(threads)]
    for check in checks:
        check()
    barrier = threading.Barrier(threads + 1)

    def run(check: Callable[[], object]) -> None:
        barrier.wait()
        for _ in range(n // threads):
            check()

    workers = [threading.Thread(target=run, args=(c,)) for c in checks]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    return (n // threads) * threads / (time.perf_counter() - start)


def request_us(url: str, n: int) -> dict[str, float]:
    """Median µs of an authenticated ``GET /v1/me`` against a server with each ``limits``, the
    two servers' requests alternating so that the machine's drift hits both alike."""
    from fastapi.testclient import TestClient

    from alignloop.config import ServeConfig
    from alignloop.serve.app import create_app

    times: dict[str, list[float]] = {"memory": [], "database": []}
    with ExitStack() as stack:
        calls = {}
        for limits in times:
            store = FeedbackStore(url)
            key = store.add_user(f"bench-{limits}-{uuid.uuid4().hex[:6]}")
            config = ServeConfig(limits=limits, rate_limit_per_minute=1e9, rate_burst=10**9, registry_poll_seconds=0)
            client = stack.enter_context(TestClient(create_app(config, store, [])))
            calls[limits] = functools.partial(client.get, "/v1/me", headers={"Authorization": f"Bearer {key}"})
        for i in range(n + 100):
            for limits, call in calls.items():
                start = time.perf_counter()
                call().raise_for_status()
                if i >= 100:  # after a warm-up
                    times[limits].append(time.perf_counter() - start)
    return {limits: statistics.median(t) * 1e6 for limits, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--pg", default=os.environ.get("ALIGNLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="a Redis URL, or none")
    args = parser.parse_args()

    rows = []
    memory = RateLimiter(PER_MINUTE, BURST)
    rows.append(("memory (RateLimiter)", *latency_us(lambda: memory.retry_after(1), args.checks),
                 per_second(lambda: lambda: memory.retry_after(1), args.checks)))
    with scratch_postgres_schema(args.pg, "alignloop_bench") as url:
        upgrade(url)
        with FeedbackStore(url) as store:
            shared = SharedRateLimiter(store, "requests", PER_MINUTE, BURST)
            rows.append(("PostgreSQL take (upsert)", *latency_us(lambda: shared.retry_after(1), args.checks),
                         per_second(lambda: lambda: shared.retry_after(1), args.checks)))
            rows.append(("PostgreSQL read (failed-login wait)", *latency_us(lambda: shared.wait(1), args.checks),
                         per_second(lambda: lambda: shared.wait(1), args.checks)))
        requests = request_us(url, args.requests)
    if args.redis != "none":
        try:
            import redis

            def redis_check() -> Callable[[], object]:
                script = redis.Redis.from_url(args.redis).register_script(REDIS_TAKE)
                return lambda: script(keys=["alignloop-bench:1"], args=[BURST, PER_MINUTE / 60, 1])

            rows.append(("Redis take (EVALSHA, redis-py)", *latency_us(redis_check(), args.checks),
                         per_second(redis_check, args.checks)))
        except ImportError:
            print("(Redis skipped: pip install redis)")
        except redis.exceptions.ConnectionError as e:
            print(f"(Redis skipped: {e})")

    print("\n| check | median µs | p99 µs | checks/s, 8 threads, one key |\n|---|---|---|---|")
    for name, median, p99, rate in rows:
        print(f"| {name} | {median:.1f} | {p99:.1f} | {rate:,.0f} |")
    print(f"\nGET /v1/me through TestClient, median: memory {requests['memory']:.0f} µs, database {requests['database']:.0f} µs "
          f"(+{requests['database'] - requests['memory']:.0f} µs a request)")


if __name__ == "__main__":
    main()
