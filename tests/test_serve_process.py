"""``alignloop serve`` as a real uvicorn process: the official ``openai`` client works against it
unchanged (streaming included), the server refuses an unmigrated database, and every feedback
write it acknowledged survives a SIGKILL in the middle of a concurrent burst."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import alignloop_command, wait_for

from alignloop.feedback.store import CompletionRecord, FeedbackStore

HI = [{"role": "user", "content": "Hello! What do you like to do?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    db: str
    keys: dict[str, str]
    proc: subprocess.Popen


def cli(*args: str) -> str:
    done = subprocess.run(alignloop_command(*args), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def serving(model_dir: Path, db: str, *extra: str) -> Iterator[subprocess.Popen]:
    port = free_port()
    proc = subprocess.Popen(alignloop_command("serve", "--model", f"tiny={model_dir}", "--db", db, "--port", str(port), *extra),
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: up(f"http://127.0.0.1:{port}"), proc, timeout=120)
        proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=30)


@pytest.fixture
def server(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Server]:
    db = f"sqlite:///{tmp_path}/feedback.db"
    cli("db", "upgrade", "--db", db)
    keys = {name: cli("users", "add", name, "--db", db) for name in ("ann", "bob")}
    with serving(tiny_model_dir, db, "--rate-limit-per-minute", "0") as proc:
        yield Server(proc.url, db, keys, proc)  # type: ignore[attr-defined]


def test_the_official_openai_client_works_unchanged(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["ann"])
    assert [m.id for m in client.models.list().data] == ["tiny"]

    whole = client.chat.completions.create(model="tiny", messages=HI, max_tokens=10, seed=5, temperature=0.7)
    text = whole.choices[0].message.content
    completion_id = whole.choices[0].completion_id  # alignloop's extension field
    stream = client.chat.completions.create(model="tiny", messages=HI, max_tokens=10, seed=5, temperature=0.7, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == text and len(pieces) > 2

    legacy = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, n=2, seed=1)
    assert len(legacy.choices) == 2 and all(c.text is not None for c in legacy.choices)

    # Feedback on the completion the client got, then someone else cannot see it.
    auth = {"Authorization": f"Bearer {server.keys['ann']}"}
    r = httpx.post(f"{server.url}/v1/feedback", json={"kind": "rating", "completion_id": completion_id, "rating": 5}, headers=auth)
    assert r.status_code == 201, r.text
    bob = {"Authorization": f"Bearer {server.keys['bob']}"}
    assert httpx.get(f"{server.url}/v1/feedback/{r.json()['id']}", headers=bob).status_code == 404

    from openai import AuthenticationError, NotFoundError

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()
    with pytest.raises(NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-9", messages=HI)


def test_the_server_refuses_an_unmigrated_database(tmp_path: Path, tiny_model_dir: Path) -> None:
    db = f"sqlite:///{tmp_path}/empty.db"
    done = subprocess.run(alignloop_command("serve", "--model", str(tiny_model_dir), "--db", db, "--port", str(free_port())),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "alignloop db upgrade" in done.stderr and "Traceback" not in done.stderr


def test_acknowledged_feedback_survives_sigkill_during_a_burst(server: Server) -> None:
    # Completions to vote on, written straight to the store (the HTTP write path is what is tested).
    store = FeedbackStore(server.db)
    ann = next(u for u in store.list_users() if u.name == "ann")
    version = json.loads(httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {server.keys['ann']}"}).text)["data"][0]["version"]
    ids = [f"chatcmpl-{uuid.uuid4().hex}-0" for _ in range(3000)]
    store.add_completions([
        CompletionRecord(id=i, request_id=i[:-2], choice_index=0, user_id=ann.id, model_name="tiny", model_version=version,
                         endpoint="chat", prompt_messages=HI, prompt_text=None, rendered_prompt="x", prompt_tokens=1,
                         completion_text=f"answer {n}", completion_token_ids=[1], finish_reason="stop", sampling={},
                         latency_ms=1.0, ttft_ms=1.0)
        for n, i in enumerate(ids)
    ])
    store.close()

    acknowledged: dict[str, int] = {}  # completion id → rating the server said it committed
    lock = threading.Lock()
    killed = threading.Event()

    def writer(part: list[str]) -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['ann']}"}, timeout=10) as client:
            for n, completion_id in enumerate(part):
                rating = 1 + n % 5
                try:
                    r = client.post("/v1/feedback", json={"kind": "rating", "completion_id": completion_id, "rating": rating})
                except httpx.HTTPError:
                    if killed.is_set():
                        return
                    raise
                assert r.status_code == 201, r.text
                with lock:
                    acknowledged[completion_id] = rating

    threads = [threading.Thread(target=writer, args=(ids[k::16],)) for k in range(16)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acknowledged) >= 600, server.proc, timeout=120)
    server.proc.send_signal(signal.SIGKILL)
    killed.set()
    server.proc.communicate()
    for t in threads:
        t.join(timeout=30)
    assert 600 <= len(acknowledged) < len(ids), "the burst should be cut short by the kill"

    import sqlalchemy as sa

    from alignloop.feedback.schema import Feedback

    with FeedbackStore(server.db):  # a restart: the store opens the database after the crash
        pass
    engine = sa.create_engine(server.db)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(Feedback.completion_id, Feedback.rating).where(Feedback.kind == "rating")).all()
    engine.dispose()
    stored = dict(rows)
    missing = {c: r for c, r in acknowledged.items() if stored.get(c) != r}
    assert not missing, f"{len(missing)} acknowledged writes lost"


def test_a_revoked_key_is_refused_by_a_running_server_at_once(server: Server) -> None:
    auth = {"Authorization": f"Bearer {server.keys['bob']}"}
    assert httpx.get(f"{server.url}/v1/me", headers=auth).status_code == 200  # seen once: a cache would hold it now
    cli("users", "revoke", "bob", "--db", server.db)
    r = httpx.get(f"{server.url}/v1/me", headers=auth)
    assert r.status_code == 401, r.text
    new = cli("users", "rotate", "bob", "--db", server.db)
    assert httpx.get(f"{server.url}/v1/me", headers={"Authorization": f"Bearer {new}"}).json()["name"] == "bob"


# 64 rows of 400 tokens, one a request, so each row that ends is replaced by the next at once:
# without preemption another user waits for a row to end (up to 400 steps), as the flood's rows
# start and end in waves.
FLOOD_REQUESTS, FLOOD_N, FLOOD_TOKENS = 64, 1, 400
TTFT_BOUND_S = 0.5  # the stated bound: under the flood, another user's p95 first token within this of an idle server's


def first_token_seconds(url: str, key: str, count: int) -> list[float]:
    """Seconds to a 1-token completion, one after another (its whole latency: the first token)."""
    times = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        for i in range(count):
            start = time.perf_counter()
            r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 1, "seed": i})
            assert r.status_code == 200, r.text
            times.append(time.perf_counter() - start)
    return times


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, math.ceil(0.95 * len(values)) - 1)]


def test_a_flood_does_not_hold_back_another_user_and_stops_when_its_client_leaves(tmp_path: Path, tiny_model_dir: Path) -> None:
    db = f"sqlite:///{tmp_path}/feedback.db"
    cli("db", "upgrade", "--db", db)
    keys = {name: cli("users", "add", name, "--db", db) for name in ("flood", "bob")}
    admin = {"Authorization": f"Bearer {cli('users', 'add', 'root', '--admin', '--db', db)}"}
    with serving(tiny_model_dir, db, "--rate-limit-per-minute", "0", "--tokens-per-minute", "0", "--max-batch", "8",
                 "--max-queued-rows-per-user", "1000", "--max-tokens-limit", "400") as proc:
        stats = lambda: httpx.get(f"{proc.url}/admin/stats", headers=admin).json()["models"]["tiny"]  # noqa: E731
        first_token_seconds(proc.url, keys["bob"], 3)  # warm up
        idle = first_token_seconds(proc.url, keys["bob"], 20)

        # The flood: long non-streaming requests on raw sockets, so the test can hang up on them.
        body = json.dumps({"model": "tiny", "messages": HI, "max_tokens": FLOOD_TOKENS, "n": FLOOD_N, "temperature": 1.0}).encode()
        host, port = proc.url.removeprefix("http://").split(":")
        sockets = []
        for _ in range(FLOOD_REQUESTS):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {keys['flood']}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            sockets.append(sock)
        wait_for(lambda: stats()["rows_running"] == 8 and stats()["rows_queued"] > 0, proc, timeout=60)
        flooded = first_token_seconds(proc.url, keys["bob"], 20)
        print(f"first token p95: idle {p95(idle):.3f} s, under the flood {p95(flooded):.3f} s")
        assert p95(flooded) <= p95(idle) + TTFT_BOUND_S, (idle, flooded)
        assert stats()["rows_running"] + stats()["rows_queued"] > 32, "the flood should still be there while bob is measured"
        assert stats()["rows_preempted"] > 0  # bob's rows took the place of the flood's

        for sock in sockets:  # every flood client hangs up
            sock.close()
        wait_for(lambda: stats()["rows_running"] + stats()["rows_queued"] == 0, proc, timeout=10)
        after = stats()["tokens_generated"]
        time.sleep(1.0)
        assert stats()["tokens_generated"] == after, "rows of a client that left are still being generated"
        assert stats()["rows_cancelled"] >= FLOOD_REQUESTS * FLOOD_N - 8 * 3  # nearly all: only rows that ended on their own are not

