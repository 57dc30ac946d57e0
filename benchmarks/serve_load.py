"""Serving under load: alignloop serve vs ``transformers serve --continuous-batching`` on the same
model folder, the same prompts and the same closed-loop clients, in one run.

For each server and each client count (1, 8, 32 by default), every client sends streaming chat
requests one after another for ``--duration`` seconds. Reported per cell: requests/s, time to
first token (first non-empty content chunk) p50/p95, generated tokens/s, errors. Generated
tokens are counted the same way for both servers: the streamed text re-tokenised with the
model's tokenizer on the client side.

Then a feedback burst on alignloop alone (transformers serve has no feedback API): ``--writers``
concurrent HTTP clients post ratings on distinct completions for ``--burst-seconds``; reported:
acknowledged (HTTP 201) writes/s and errors, on SQLite (WAL) and PostgreSQL.

    .venv/bin/python benchmarks/serve_load.py --size tiny-5m --duration 30
    # transformers serve from a separate venv with transformers[serving]:
    #   python3 -m venv bench-work/serve-venv && bench-work/serve-venv/bin/pip install torch==2.13.0 'transformers[serving]'

Both servers get the machine to themselves in turn (2 torch threads each); the load generator
is asyncio with bare HTTP/1.1 connections in this process (see :class:`Connection`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Hi! How was your weekend?", "What do you like to cook?", "Tell me about your favourite book.",
    "Do you have any pets?", "What music do you listen to?", "Where would you like to travel next?",
    "What did you do today?", "Any plans for the holidays?", "What is your favourite season and why?",
    "How do you relax after work?", "What sports do you enjoy?", "Do you like to read in the evening?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not come up")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class Connection:
    """A bare HTTP/1.1 keep-alive connection over asyncio streams. httpx's AsyncClient tops out
    near 150 requests/s at 32 concurrent connections on this 2-core machine (a raw client gets
    1,200/s from the same minimal FastAPI app), so it would measure itself, not the servers."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port, self.headers = host, int(port), headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, AsyncIterator[bytes]]:
        """Send a request; (status, an iterator over the body's pieces as they arrive)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode() if body is not None else b""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(data)}", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await self.writer.drain()
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        return status, self._body(fields)

    async def _body(self, fields: dict[str, str]) -> AsyncIterator[bytes]:
        if fields.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    return
                yield await self.reader.readexactly(size)
                await self.reader.readexactly(2)
        else:
            yield await self.reader.readexactly(int(fields.get("content-length", "0")))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def one_request(conn: Connection, model: str, prompt: str, max_tokens: int, seed: int) -> tuple[float | None, str]:
    """(seconds to the first content chunk, the streamed text) of one streaming chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "temperature": 1.0, "seed": seed}
    start, first, text, buffer = time.perf_counter(), None, [], b""
    status, pieces = await conn.request("POST", "/v1/chat/completions", body)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {b''.join([p async for p in pieces])[:200]!r}")
    async for piece in pieces:
        buffer += piece
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            line = event.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if first is None:
                        first = time.perf_counter() - start
                    text.append(content)
    return first, "".join(text)


async def closed_loop(url: str, headers: dict, model: str, clients: int, duration: float, max_tokens: int, tokenizer) -> dict:
    ttfts: list[float] = []
    tokens = requests = errors = 0
    error_samples: list[str] = []
    deadline = time.perf_counter() + duration

    async def user(k: int) -> None:
        nonlocal tokens, requests, errors
        conn, n = Connection(url, headers), 0
        while time.perf_counter() < deadline:
            try:
                first, text = await one_request(conn, model, PROMPTS[(k + n) % len(PROMPTS)], max_tokens, seed=k * 1000 + n)
                requests += 1
                tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
                if first is not None:
                    ttfts.append(first)
            except Exception as e:  # counted, not fatal: the error rate is a result
                errors += 1
                await conn.close()
                if len(error_samples) < 3:
                    error_samples.append(repr(e)[:300])
            n += 1
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(user(k) for k in range(clients)))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": requests, "errors": errors, "wall_s": round(wall, 2),
            "requests_per_s": round(requests / wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95), "error_samples": error_samples}


async def feedback_burst(url: str, key: str, completion_ids: list[str], writers: int, seconds: float, batch: int = 1) -> dict:
    """``writers`` clients rate distinct completions as fast as they are answered: one vote per
    ``POST /v1/feedback`` (batch 1) or ``batch`` votes per ``POST /v1/feedback/batch``; a write
    counts when its own answer says 201 (committed)."""
    acked = errors = 0
    queue = list(reversed(completion_ids))
    deadline = time.perf_counter() + seconds

    async def writer() -> None:
        nonlocal acked, errors
        conn = Connection(url, {"Authorization": f"Bearer {key}"})
        while queue and time.perf_counter() < deadline:
            votes = [{"kind": "rating", "completion_id": queue.pop(), "rating": 1 + len(queue) % 5} for _ in range(min(batch, len(queue)))]
            if batch == 1:
                status, body = await conn.request("POST", "/v1/feedback", votes[0])
                async for _ in body:
                    pass
                statuses = [status]
            else:
                status, body = await conn.request("POST", "/v1/feedback/batch", {"items": votes})
                answer = b"".join([piece async for piece in body])
                statuses = [item["status"] for item in json.loads(answer)["data"]] if status == 200 else [status] * len(votes)
            acked += sum(s == 201 for s in statuses)
            errors += sum(s != 201 for s in statuses)
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    wall = time.perf_counter() - start
    return {"writers": writers, "batch": batch, "acknowledged": acked, "errors": errors, "wall_s": round(wall, 2),
            "writes_per_s": round(acked / wall, 1)}


def alignloop(*args: str) -> list[str]:
    return [sys.executable, "-m", "alignloop", *args]


@contextmanager
def alignloop_server(args: argparse.Namespace, model_dir: Path, db: str, env: dict) -> Iterator[tuple[str, str, subprocess.Popen]]:
    """A migrated store, a user, and `alignloop serve` on it: yields (url, key, process)."""
    subprocess.run(alignloop("db", "upgrade", "--db", db), check=True, env=env, capture_output=True)
    key = subprocess.run(alignloop("users", "add", f"bench-{uuid.uuid4().hex[:8]}", "--db", db), check=True, env=env,
                         capture_output=True, text=True).stdout.strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(alignloop("serve", "--model", f"m={model_dir}", "--db", db, "--port", str(port),
                                      "--rate-limit-per-minute", "0", "--max-batch", str(args.max_batch),
                                      "--stream-interval", str(args.stream_interval)),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(url, proc, "/health")
        yield url, key, proc
    finally:
        stop(proc)


@contextmanager
def transformers_server(args: argparse.Namespace, model_dir: Path, env: dict) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(args.transformers_cli), "serve", "--continuous-batching", "--device", "cpu",
                             "--dtype", "float32", "--port", str(port), "--host", "127.0.0.1", str(model_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(args.out.with_suffix(".transformers.log"), "w"))
    try:
        wait_up(url, proc, "/v1/models")
        yield url, proc
    finally:
        stop(proc)


def run_bursts(url: str, db: str, key: str, args: argparse.Namespace, env: dict) -> dict:
    """One burst per ``--burst-batch`` size: {"feedback_<db>": batch 1, "feedback_<db>_batch<N>": ...}."""
    name = "postgresql" if db.startswith("postgresql") else "sqlite"
    return {f"feedback_{name}" + (f"_batch{b}" if b > 1 else ""): run_burst(url, db, key, args, env, b) for b in args.burst_batch}


def completions_to_rate(url: str, db: str, key: str, count: int) -> list[str]:
    """``count`` completions of the key's user on the served model "m", written through the store
    (fast), for a feedback burst to rate over HTTP."""
    from alignloop.feedback.store import CompletionRecord, FeedbackStore

    version = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"][0]["version"]
    store = FeedbackStore(db)
    user = store.user_by_key(key)
    ids = [f"chatcmpl-{uuid.uuid4().hex}-0" for _ in range(count)]
    for start in range(0, len(ids), 5000):
        store.add_completions([
            CompletionRecord(id=i, request_id=i[:-2], choice_index=0, user_id=user.id, model_name="m", model_version=version,
                             endpoint="chat", prompt_messages=[{"role": "user", "content": "hi"}], prompt_text=None,
                             rendered_prompt="hi", prompt_tokens=1, completion_text="hello", completion_token_ids=[1],
                             finish_reason="stop", sampling={}, latency_ms=1.0, ttft_ms=1.0)
            for i in ids[start:start + 5000]
        ])
    store.close()
    return ids


def model_folder(size: str, work: Path) -> Path:
    """The built-in ``size`` (random init, seed 0, the chitchat tokenizer, ChatML) saved under ``work``."""
    import torch

    from alignloop.models.builtin import builtin_model, builtin_tokenizer
    from alignloop.models.load import save_model

    tokenizer = builtin_tokenizer()
    torch.manual_seed(0)
    folder = work / size
    save_model(builtin_model(size, tokenizer), tokenizer, folder)
    return folder


def run_burst(url: str, db: str, key: str, args: argparse.Namespace, env: dict, batch: int = 1) -> dict:
    """Completions to vote on are written through the store (fast), then rated over HTTP."""
    ids = completions_to_rate(url, db, key, int(args.burst_seconds * (6000 if batch == 1 else 12000)))
    burst = asyncio.run(feedback_burst(url, key, ids, args.writers, args.burst_seconds, batch))
    print("feedback", db.split(":")[0], json.dumps(burst), flush=True)
    return burst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny-5m", help="built-in size saved as the shared model folder (random init, chitchat tokenizer, ChatML)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of closed-loop load per cell")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--stream-interval", type=int, default=2, help="alignloop serve --stream-interval (decode steps between stream updates)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--writers", type=int, default=32)
    ap.add_argument("--burst-seconds", type=float, default=10.0)
    ap.add_argument("--burst-batch", default="1,50", help="votes per request in the feedback bursts, comma-separated (1: POST /v1/feedback; N>1: POST /v1/feedback/batch)")
    ap.add_argument("--feedback-only", action="store_true", help="only the feedback bursts (no serving load, no transformers serve)")
    ap.add_argument("--pg", default=os.environ.get("ALIGNLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--transformers-cli", type=Path, default=REPO / "bench-work" / "serve-venv" / "bin" / "transformers")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each cell per server, in alternating order; medians reported")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench-work" / "results" / "serve_load.json")
    args = ap.parse_args()
    args.clients = [] if args.feedback_only else [int(c) for c in args.clients.split(",")]
    args.skip_transformers = args.skip_transformers or args.feedback_only
    args.burst_batch = [int(b) for b in args.burst_batch.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    from alignloop.models.builtin import builtin_tokenizer

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    tokenizer = builtin_tokenizer()
    model_dir = model_folder(args.size, work)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    results: dict = {"size": args.size, "stream_interval": args.stream_interval, "max_tokens": args.max_tokens, "duration_s": args.duration, "threads": args.threads,
                     "repeats": args.repeats, "alignloop": [], "transformers": []}
    with ExitStack() as servers:
        ours, key, our_proc = servers.enter_context(alignloop_server(args, model_dir, f"sqlite:///{work}/feedback.db", env))
        targets = {"alignloop": (ours, {"Authorization": f"Bearer {key}"}, "m", our_proc)}
        if not args.skip_transformers:
            theirs, their_proc = servers.enter_context(transformers_server(args, model_dir, env))
            targets["transformers"] = (theirs, {}, str(model_dir), their_proc)
        # Both servers stay up and take turns, cell by cell, in alternating order, so drift of
        # the machine during the run hits both alike. The one not measured is frozen (SIGSTOP):
        # an idle `transformers serve` still takes CPU (ours ran 20× slower beside it).
        for clients in ([2] if args.clients else []) + args.clients:  # the first round warms up (transformers serve loads the model)
            cells: dict[str, list[dict]] = {name: [] for name in targets}
            for repeat in range(args.repeats if clients in args.clients else 1):
                for name in (list(targets) if repeat % 2 == 0 else list(reversed(targets))):
                    url, headers, model, proc = targets[name]
                    others = [t[3] for n, t in targets.items() if n != name]
                    for other in others:
                        other.send_signal(signal.SIGSTOP)
                    try:
                        cpu = cpu_seconds(proc.pid)
                        cell = asyncio.run(closed_loop(url, headers, model, clients, args.duration, args.max_tokens, tokenizer))
                        # The server's own CPU per generated token: unlike tokens/s, it does not
                        # depend on how much of the two cores the load generator took meanwhile.
                        cell["server_cpu_ms_per_token"] = round(1000 * (cpu_seconds(proc.pid) - cpu) / max(1, cell["tokens_per_s"] * cell["wall_s"]), 3)
                    finally:
                        for other in others:
                            other.send_signal(signal.SIGCONT)
                    print(name, json.dumps(cell), flush=True)
                    cells[name].append(cell)
            if clients not in args.clients:
                continue
            for name, runs in cells.items():
                results[name].append(median_cell(runs))
        for name, (_, _, _, proc) in targets.items():
            if name != "alignloop":
                proc.send_signal(signal.SIGSTOP)  # frozen for good: stop() sends SIGINT after a SIGCONT
        results.update(run_bursts(ours, f"sqlite:///{work}/feedback.db", key, args, env))
        for name, (_, _, _, proc) in targets.items():
            if name != "alignloop":
                proc.send_signal(signal.SIGCONT)
    try:
        results.update(run_pg_burst(args, model_dir, env))
    except Exception as e:  # no server reachable: say so in the results
        results["feedback_postgresql"] = {"error": repr(e)[:300]}
    args.out.write_text(json.dumps(results, indent=1))
    print_table(results)


def median_cell(runs: list[dict]) -> dict:
    """The repeats of one cell: medians of the rates and latencies, sums of requests and errors."""
    cell = dict(runs[0])
    for key in ("requests_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p95_s", "server_cpu_ms_per_token"):
        values = [r[key] for r in runs if r.get(key) is not None]
        cell[key] = statistics.median(values) if values else None
    for key in ("requests", "errors"):
        cell[key] = sum(r[key] for r in runs)
    cell["runs"] = runs
    return cell


def run_pg_burst(args: argparse.Namespace, model_dir: Path, env: dict) -> dict:
    """The feedback burst on PostgreSQL, in a fresh schema of the server's database."""
    from alignloop.feedback.database import scratch_postgres_schema

    with scratch_postgres_schema(args.pg, "alignloop_bench") as url, alignloop_server(args, model_dir, url, env) as (base, key, _):
        return run_bursts(base, url, key, args, env)


def print_table(results: dict) -> None:
    print(f"\n{results['size']}, max_tokens {results['max_tokens']}, {results['duration_s']:g} s per cell, {results['threads']} threads")
    print("| server | clients | req/s | TTFT p50 (s) | TTFT p95 (s) | gen tok/s | server CPU ms/token | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for server in ("alignloop", "transformers"):
        for cell in results.get(server, []):
            fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"| {server} | {cell['clients']} | {cell['requests_per_s']:.2f} | {fmt(cell['ttft_p50_s'])} | "
                  f"{fmt(cell['ttft_p95_s'])} | {cell['tokens_per_s']:.0f} | {fmt(cell.get('server_cpu_ms_per_token'))} | {cell['errors']} |")
    for name, burst in results.items():
        if not name.startswith("feedback_"):
            continue
        if "writes_per_s" in burst:
            print(f"{name}: {burst['writes_per_s']:.0f} acknowledged writes/s ({burst['writers']} writers, "
                  f"{burst.get('batch', 1)} votes a request, {burst['errors']} errors)")
        else:
            print(f"{name}: {burst}")


if __name__ == "__main__":
    main()
