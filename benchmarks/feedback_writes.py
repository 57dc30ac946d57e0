#!/usr/bin/env python
"""Acknowledged feedback writes per second through :class:`~alignloop.feedback.store.FeedbackStore`,
on SQLite (WAL, ``synchronous=NORMAL``, or ``FULL`` with ``--durability normal,full``) and
PostgreSQL, from 1, 8 and 32 threads.

The work, per cell: ``--writes`` ``put_feedback`` calls split evenly over the threads, each a new
rating vote on its own completion (an INSERT, never a replacement), each thread calling again as
soon as its previous write was acknowledged, i.e. committed. writes/s = writes / wall time; the
latency is one call's, from the call to its return; "batch" is the mean number of writes the
group-commit writer put in one transaction. The store's process is this one, so the numbers
include the Python on both sides (validation, the queue, the writer), not just the database.

    .venv/bin/python benchmarks/feedback_writes.py
    .venv/bin/python benchmarks/feedback_writes.py --writes 20000 --pg none

PostgreSQL: $ALIGNLOOP_TEST_PG or --pg (default postgresql+psycopg://postgres@127.0.0.1:5432/test),
in a fresh schema dropped afterwards; ``--pg none`` skips it. Target: ≥ 2,000 writes/s on SQLite
from 32 threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alignloop.feedback.database import scratch_postgres_schema
from alignloop.feedback.store import CompletionRecord, FeedbackInput, FeedbackStore, upgrade


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as folder:
        yield f"sqlite:///{Path(folder) / 'feedback.db'}"


def completions(user_id: int, prefix: str, n: int) -> list[CompletionRecord]:
    return [CompletionRecord(
        id=f"chatcmpl-{prefix}{i}-0", request_id=f"chatcmpl-{prefix}{i}", choice_index=0, user_id=user_id,
        model_name="tiny", model_version="v1", endpoint="chat",
        prompt_messages=[{"role": "user", "content": f"Question {i}?"}], prompt_text=None,
        rendered_prompt=f"<|user|>Question {i}?<|assistant|>", prompt_tokens=6, completion_text=f"Answer {i}.",
        completion_token_ids=[1, 2, 3], finish_reason="stop", sampling={"temperature": 1.0, "n": 1},
        latency_ms=10.0, ttft_ms=2.0) for i in range(n)]


def bench_cell(store: FeedbackStore, user_id: int, threads: int, writes: int, prefix: str) -> dict:
    per_thread = writes // threads
    records = completions(user_id, prefix, per_thread * threads)
    for start in range(0, len(records), 1000):
        store.add_completions(records[start:start + 1000])
    ids = [c.id for c in records]
    latencies: list[float] = []
    lock = threading.Lock()

    def vote(part: list[str]) -> None:
        mine = []
        for cid in part:
            t0 = time.perf_counter()
            _, outcome = store.put_feedback(user_id, FeedbackInput("rating", cid, rating=4))
            mine.append(time.perf_counter() - t0)
            assert outcome == "created"
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=vote, args=(ids[t::threads],)) for t in range(threads)]
    batches0, t0 = store._writer.batches, time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"writes": len(latencies), "per_s": len(latencies) / wall,
            "p50_ms": 1000 * statistics.median(latencies), "p95_ms": 1000 * latencies[int(0.95 * len(latencies))],
            "batch": len(latencies) / max(1, store._writer.batches - batches0)}


def bench_backend(url: str, threads: list[int], writes: int, durability: str = "normal") -> list[dict]:
    upgrade(url)
    rows = []
    with FeedbackStore(url, durability=durability) as store:
        user = store.ensure_user("bench")
        store.register_model("tiny", "v1", "/models/tiny")
        bench_cell(store, user.id, 8, 400, "warmup")  # compile caches, pool, page cache
        for n in threads:
            rows.append({"threads": n, **bench_cell(store, user.id, n, writes, f"t{n}x")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=8000, help="put_feedback calls per cell (default: 8000)")
    ap.add_argument("--threads", default="1,8,32", help="thread counts, comma-separated (default: 1,8,32)")
    ap.add_argument("--durability", default="normal", help="SQLite settings to measure, comma-separated: normal, full (serve --db-durability)")
    ap.add_argument("--pg", help="PostgreSQL URL (default: $ALIGNLOOP_TEST_PG or the local server's test database); 'none' skips it")
    args = ap.parse_args()
    args.pg = args.pg or os.environ.get("ALIGNLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    threads = [int(n) for n in args.threads.split(",")]

    results = []
    for durability in args.durability.split(","):
        with sqlite_database() as url:
            results += [{"backend": f"SQLite WAL, synchronous={durability.upper()}", **row}
                        for row in bench_backend(url, threads, args.writes, durability)]
    if args.pg != "none":
        with scratch_postgres_schema(args.pg, "alignloop_bench") as url:
            results += [{"backend": "PostgreSQL", **row} for row in bench_backend(url, threads, args.writes)]

    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print("| backend | threads | writes | acknowledged writes/s | p50 ms | p95 ms | writes per commit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['backend']} | {r['threads']} | {r['writes']} | {r['per_s']:,.0f} | {r['p50_ms']:.2f} | "
              f"{r['p95_ms']:.2f} | {r['batch']:.1f} |")


if __name__ == "__main__":
    main()
