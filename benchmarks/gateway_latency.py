"""The feedback gateway's cost: time to first token (p50/p95) of streaming chat requests sent to
``transformers serve`` directly, and through ``alignloop serve --upstream`` in front of it (which
authenticates, counts the user's budget, re-emits each chunk with its completion id and stores
every completion), with 8 and 32 concurrent streaming clients.

    .venv/bin/python benchmarks/gateway_latency.py --size tiny-5m --duration 20 --repeats 2

Each client is a closed loop (a request, its whole stream, the next request) on its own
keep-alive connection, through serve_load.py's bare HTTP client (httpx would measure itself).
Both paths take turns cell by cell in alternating order; "gateway CPU ms/request" is the gateway
process's own CPU time per answered request, which the two cores share with the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import uuid
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

from serve_load import alignloop, closed_loop, cpu_seconds, free_port, median_cell, model_folder, stop, wait_up

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def upstream_server(cli: Path, model_dir: Path, env: dict, log: Path, continuous: bool) -> Iterator[tuple[str, subprocess.Popen]]:
    """``transformers serve`` pinned to ``model_dir`` (loaded at start); yields its root URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = ["--continuous-batching"] if continuous else []
    proc = subprocess.Popen([str(cli), "serve", *flags, "--device", "cpu", "--dtype", "float32", "--port", str(port),
                             "--host", "127.0.0.1", str(model_dir)], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        wait_up(url, proc, "/health")
        yield url, proc
    finally:
        stop(proc)


@contextmanager
def gateway_server(upstream: str, model_dir: Path, db: str, env: dict) -> Iterator[tuple[str, str, subprocess.Popen]]:
    """``alignloop serve --upstream`` with no rate limits; yields (root URL, a user's key, process)."""
    subprocess.run(alignloop("db", "upgrade", "--db", db), check=True, env=env, capture_output=True)
    key = subprocess.run(alignloop("users", "add", f"bench-{uuid.uuid4().hex[:8]}", "--db", db), check=True, env=env,
                         capture_output=True, text=True).stdout.strip()
    port = free_port()
    proc = subprocess.Popen(alignloop("serve", "--upstream", f"{upstream}/v1", "--upstream-model", f"m={model_dir}", "--db", db,
                                      "--port", str(port), "--rate-limit-per-minute", "0", "--tokens-per-minute", "0",
                                      "--registry-poll-seconds", "0"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc, "/health")
        yield url, key, proc
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny-5m", help="built-in size saved as the model folder (random init, chitchat tokenizer)")
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of closed-loop load per cell")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each cell per path, in alternating order; medians reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-continuous-batching", dest="continuous", action="store_false",
                    help="transformers serve without --continuous-batching")
    ap.add_argument("--transformers-cli", type=Path, default=Path(sys.executable).with_name("transformers"))
    ap.add_argument("--out", type=Path, default=REPO / "bench-work" / "results" / "gateway_latency.json")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    from alignloop.models.builtin import builtin_tokenizer

    work = Path(tempfile.mkdtemp(prefix="gateway-latency-"))
    tokenizer = builtin_tokenizer()
    model_dir = model_folder(args.size, work)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict = {"size": args.size, "max_tokens": args.max_tokens, "duration_s": args.duration, "threads": args.threads,
                     "continuous_batching": args.continuous, "repeats": args.repeats, "direct": [], "gateway": []}
    with upstream_server(args.transformers_cli, model_dir, env, args.out.with_suffix(".transformers.log"), args.continuous) as (up, _), \
            gateway_server(up, model_dir, f"sqlite:///{work}/feedback.db", env) as (gw, key, gw_proc):
        targets = {"direct": (up, {}, str(model_dir)), "gateway": (gw, {"Authorization": f"Bearer {key}"}, "m")}
        for n in [2, *clients]:  # the first round warms both paths up
            cells: dict[str, list[dict]] = {name: [] for name in targets}
            for repeat in range(args.repeats if n in clients else 1):
                for name in (list(targets) if repeat % 2 == 0 else list(reversed(targets))):
                    url, headers, model = targets[name]
                    cpu = cpu_seconds(gw_proc.pid)
                    cell = asyncio.run(closed_loop(url, headers, model, n, args.duration, args.max_tokens, tokenizer))
                    cell["gateway_cpu_ms_per_request"] = round(1000 * (cpu_seconds(gw_proc.pid) - cpu) / max(1, cell["requests"]), 2)
                    print(name, json.dumps(cell), flush=True)
                    cells[name].append(cell)
            if n in clients:
                for name, runs in cells.items():
                    results[name].append({**median_cell(runs), "gateway_cpu_ms_per_request": sorted(
                        r["gateway_cpu_ms_per_request"] for r in runs)[len(runs) // 2]})
    args.out.write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\n{results['size']}, max_tokens {results['max_tokens']}, {results['duration_s']:g} s per cell, "
          f"{results['threads']} threads, continuous batching {'on' if results['continuous_batching'] else 'off'}")
    print("| path | clients | req/s | TTFT p50 (ms) | TTFT p95 (ms) | gateway CPU ms/request | errors |")
    print("|---|---|---|---|---|---|---|")
    for direct, gateway in zip(results["direct"], results["gateway"]):
        for name, cell in (("transformers serve, direct", direct), ("through the gateway", gateway)):
            fmt = lambda v: "–" if v is None else f"{1000 * v:.0f}"  # noqa: E731
            cpu = "–" if name.endswith("direct") else f"{cell['gateway_cpu_ms_per_request']:.1f}"
            print(f"| {name} | {cell['clients']} | {cell['requests_per_s']:.2f} | {fmt(cell['ttft_p50_s'])} | "
                  f"{fmt(cell['ttft_p95_s'])} | {cpu} | {cell['errors']} |")


if __name__ == "__main__":
    main()
