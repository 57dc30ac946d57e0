"""A server change measured before and after, in one run: two ``alignloop serve`` processes on
the same model folder, one from this checkout and one from another checkout's ``src/`` (e.g. a
worktree of the commit before the change), take turns on the same load, round after round in
alternating order, the one not measured frozen (SIGSTOP). Per round and side: acknowledged
feedback writes/s from ``--writers`` clients (one vote a request, distinct completions), and
streamed tokens/s from ``--clients`` closed-loop chat clients; beside each, the server's own CPU
per write or per token, which moves less than a rate does when the machine's load drifts.

    git worktree add ../before HEAD~1
    .venv/bin/python benchmarks/serve_ab.py --before ../before/src --rounds 4
    .venv/bin/python benchmarks/serve_ab.py --before ../before/src --db postgresql

Reported: medians over the rounds and their ratio (after / before).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import alignloop_server, closed_loop, completions_to_rate, cpu_seconds, feedback_burst, model_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="the other checkout's src/ folder")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--pg", default=os.environ.get("ALIGNLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--writers", type=int, default=32)
    ap.add_argument("--burst-seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of streaming load per round and side (0: none)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--size", default="tiny-5m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--stream-interval", type=int, default=2)
    args = ap.parse_args()

    from alignloop.feedback.database import scratch_postgres_schema
    from alignloop.models.builtin import builtin_tokenizer

    work = Path(tempfile.mkdtemp(prefix="serve-ab-"))
    tokenizer = builtin_tokenizer()
    model_dir = model_folder(args.size, work)
    base_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    sources = {"before": args.before.resolve(), "after": REPO / "src"}
    results: dict = {side: [] for side in sources}
    with ExitStack() as stack:
        servers = {}
        for side, src in sources.items():
            env = {**base_env, "PYTHONPATH": str(src)}
            db = (stack.enter_context(scratch_postgres_schema(args.pg, "alignloop_ab")) if args.db == "postgresql"
                  else f"sqlite:///{work}/{side}.db")
            url, key, proc = stack.enter_context(alignloop_server(args, model_dir, db, env))
            ids = completions_to_rate(url, db, key, int(args.burst_seconds * 1000 * (args.rounds + 1)))
            servers[side] = (url, key, proc, ids)
        for round_ in range(args.rounds):
            for side in (list(sources) if round_ % 2 == 0 else list(reversed(sources))):
                url, key, proc, ids = servers[side]
                other = next(p for s, (_, _, p, _) in servers.items() if s != side)
                other.send_signal(signal.SIGSTOP)
                try:
                    cell: dict = {"round": round_}
                    cpu = cpu_seconds(proc.pid)
                    start = round_ * int(args.burst_seconds * 1000)
                    burst = asyncio.run(feedback_burst(url, key, ids[start:start + int(args.burst_seconds * 1000)], args.writers,
                                                       args.burst_seconds))
                    cell["writes_per_s"] = burst["writes_per_s"]
                    cell["cpu_ms_per_write"] = round(1000 * (cpu_seconds(proc.pid) - cpu) / max(1, burst["acknowledged"]), 3)
                    cell["write_errors"] = burst["errors"]
                    if args.duration > 0:
                        cpu = cpu_seconds(proc.pid)
                        load = asyncio.run(closed_loop(url, {"Authorization": f"Bearer {key}"}, "m", args.clients, args.duration,
                                                       args.max_tokens, tokenizer))
                        cell["tokens_per_s"] = load["tokens_per_s"]
                        cell["cpu_ms_per_token"] = round(1000 * (cpu_seconds(proc.pid) - cpu) / max(1, load["tokens_per_s"] * load["wall_s"]), 3)
                        cell["ttft_p95_s"] = load["ttft_p95_s"]
                        cell["stream_errors"] = load["errors"]
                finally:
                    other.send_signal(signal.SIGCONT)
                print(side, json.dumps(cell), flush=True)
                results[side].append(cell)

    keys = [k for k in ("writes_per_s", "cpu_ms_per_write", "tokens_per_s", "cpu_ms_per_token", "ttft_p95_s") if k in results["after"][0]]
    medians = {side: {k: statistics.median(c[k] for c in cells) for k in keys} for side, cells in results.items()}
    print(f"\n{args.db}, {args.rounds} rounds, {args.writers} writers × {args.burst_seconds:g} s, {args.clients} streaming clients × "
          f"{args.duration:g} s, {args.size}, {args.threads} threads; medians")
    print("| measure | before | after | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for k in keys:
        b, a = medians["before"][k], medians["after"][k]
        print(f"| {k} | {b:.3f} | {a:.3f} | {a / b:.3f} |")
    out = Path(os.environ.get("BENCH_WORK", REPO / "bench-work")) / "results" / f"serve_ab_{args.db}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": results, "medians": medians, "settings": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
