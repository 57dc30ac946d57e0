"""The server under the abuse issue 30 names, measured against a real ``alignloop serve`` process:

1. **Oversized chat bodies**: two clients each send three 800 KB chat bodies (refused in the end)
   while a third polls ``/health``; reported: ``/health`` latency p50 / p95 / max, idle and during.
2. **A flood, then a hang-up**: one user sends ``--flood`` non-streaming requests (``n`` rows of
   ``--flood-tokens`` tokens each) and disconnects after ``--flood-seconds``; meanwhile another user
   sends 1-token requests one after another. Reported: that user's time to first token p50 / p95,
   idle and under the flood; the rows the batcher preempted; tokens generated after the flood's
   clients left (from ``GET /admin/stats``).

    .venv/bin/python benchmarks/serve_abuse.py                 # the tiny-5m built-in model, ~1 min
    .venv/bin/python benchmarks/serve_abuse.py --size tiny-20m

Run it from another checkout (``PYTHONPATH=../before/src``) to measure an older server the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HI = [{"role": "user", "content": "Hello! What do you like to do?"}]


def alignloop(*args: str) -> list[str]:
    return [sys.executable, "-m", "alignloop", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50_ms": round(1000 * statistics.median(ordered), 1), "p95_ms": round(1000 * ordered[max(0, int(0.95 * len(ordered)) - 1)], 1),
            "max_ms": round(1000 * ordered[-1], 1), "n": len(ordered)}


def health_latencies(url: str, seconds: float) -> list[float]:
    times, end = [], time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < end:
            start = time.perf_counter()
            client.get("/health")
            times.append(time.perf_counter() - start)
            time.sleep(0.02)
    return times


def first_tokens(url: str, key: str, count: int) -> list[float]:
    times = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        for i in range(count):
            start = time.perf_counter()
            r = client.post("/v1/chat/completions", json={"model": "m", "messages": HI, "max_tokens": 1, "seed": i})
            r.raise_for_status()
            times.append(time.perf_counter() - start)
    return times


def raw_post(host: str, port: int, key: str, body: bytes) -> socket.socket:
    sock = socket.create_connection((host, port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny-5m")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--flood", type=int, default=16, help="flood requests")
    ap.add_argument("--flood-n", type=int, default=8)
    ap.add_argument("--flood-tokens", type=int, default=400)
    ap.add_argument("--flood-seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("BENCH_WORK", "bench-work")) / "results" / "serve_abuse.json")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(Path(__file__).parent))
    from serve_load import model_folder

    work = Path(tempfile.mkdtemp(prefix="serve-abuse-"))
    model_dir = model_folder(args.size, work)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    db = f"sqlite:///{work}/feedback.db"
    run = lambda *a: subprocess.run(alignloop(*a), env=env, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    run("db", "upgrade", "--db", db)
    keys = {name: run("users", "add", name, "--db", db, *(["--admin"] if name == "root" else [])) for name in ("flood", "bob", "root")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    help_text = subprocess.run(alignloop("serve", "--help"), env=env, capture_output=True, text=True).stdout
    extra = ["--tokens-per-minute", "0", "--max-queued-rows-per-user", "100000"] if "--tokens-per-minute" in help_text else []
    proc = subprocess.Popen(alignloop("serve", "--model", f"m={model_dir}", "--db", db, "--port", str(port), "--rate-limit-per-minute", "0",
                                      "--max-batch", str(args.max_batch), "--max-tokens-limit", str(args.flood_tokens), *extra),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict = {"size": args.size, "max_batch": args.max_batch, "cpu_count": os.cpu_count()}
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        first_tokens(url, keys["bob"], 3)

        # 1. oversized chat bodies
        results["health_idle"] = percentiles(health_latencies(url, 3.0))
        big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "word " * 160_000}]}).encode()  # 800 KB

        def big_sender(statuses: list[int]) -> None:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['flood']}", "Content-Type": "application/json"},
                              timeout=120) as client:
                for _ in range(3):
                    statuses.append(client.post("/v1/chat/completions", content=big).status_code)

        statuses: list[int] = []
        senders = [threading.Thread(target=big_sender, args=(statuses,)) for _ in range(2)]
        polled: list[float] = []
        poller = threading.Thread(target=lambda: polled.extend(health_latencies(url, 4.0)))
        poller.start()
        for t in senders:
            t.start()
        for t in senders + [poller]:
            t.join()
        results["health_during_big_bodies"] = percentiles(polled)
        results["big_body_statuses"] = statuses

        # 2. the flood and the hang-up
        results["ttft_idle"] = percentiles(first_tokens(url, keys["bob"], 30))
        body = json.dumps({"model": "m", "messages": HI, "max_tokens": args.flood_tokens, "n": args.flood_n, "temperature": 1.0}).encode()
        sockets = [raw_post("127.0.0.1", port, keys["flood"], body) for _ in range(args.flood)]
        time.sleep(1.0)
        under: list[float] = []
        deadline = time.monotonic() + args.flood_seconds - 1.0
        while time.monotonic() < deadline:
            under += first_tokens(url, keys["bob"], 1)
        admin = {"Authorization": f"Bearer {keys['root']}"}
        stats = lambda: httpx.get(f"{url}/admin/stats", headers=admin).json()["models"]["m"] if "/admin/stats" in httpx.get(f"{url}/openapi.json").text else None  # noqa: E731
        before_hangup = stats()
        hung_up = time.monotonic()
        for sock in sockets:
            sock.close()
        time.sleep(2.0)
        after = stats()
        time.sleep(2.0)
        later = stats()
        results["ttft_under_flood"] = percentiles(under)
        results["flood"] = {"requests": args.flood, "n": args.flood_n, "max_tokens": args.flood_tokens, "stats_before_hangup": before_hangup,
                            "stats_2s_after": after, "stats_4s_after": later,
                            "tokens_generated_2s_to_4s_after_hangup": None if after is None else later["tokens_generated"] - after["tokens_generated"]}
        if after is None:  # an older server without /admin/stats: time until a 1-token request is fast again
            results["flood"]["seconds_until_idle_again"] = round(time.monotonic() - hung_up, 1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
