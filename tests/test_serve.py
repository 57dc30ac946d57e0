"""The HTTP API through FastAPI's TestClient: OpenAI-shaped completions (whole and streamed)
stored with their provenance, feedback of every kind, vote replacement and idempotency, auth,
rate limits, caps and bad input answered as 4xx naming the field."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from alignloop.config import ServeConfig
from alignloop.feedback.store import FeedbackStore, upgrade
from alignloop.serve.app import create_app
from alignloop.serve.dependencies import get_store
from alignloop.serve.engine import ServedModel, TextStream, model_version, parse_model_spec

HI = [{"role": "user", "content": "Hi there, how are you?"}]


@pytest.fixture
def db_url(migrated_sqlite_url: str) -> str:
    return migrated_sqlite_url


class Api:
    """A TestClient with helpers; ``keys`` maps user name → API key."""

    def __init__(self, client: TestClient, store: FeedbackStore, keys: dict[str, str]) -> None:
        self.client, self.store, self.keys = client, store, keys

    def auth(self, user: str = "ann") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}

    def chat(self, user: str = "ann", **body: Any) -> Any:
        body = {"model": "tiny", "messages": HI, "max_tokens": 8, **body}
        return self.client.post("/v1/chat/completions", json=body, headers=self.auth(user))

    def completion_id(self, user: str = "ann", **body: Any) -> str:
        r = self.chat(user, **body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["completion_id"]

    def feedback(self, user: str = "ann", key: str | None = None, **body: Any) -> Any:
        headers = {**self.auth(user), **({"Idempotency-Key": key} if key else {})}
        return self.client.post("/v1/feedback", json=body, headers=headers)


@contextmanager
def api(db_url: str, served: ServedModel, **config: Any) -> Iterator[Api]:
    store = FeedbackStore(db_url)
    keys = {"ann": store.add_user("ann"), "bob": store.add_user("bob"), "root": store.add_user("root", admin=True)}
    with TestClient(create_app(ServeConfig(**config), store, [served])) as client:
        yield Api(client, FeedbackStore(db_url), keys)


def error_of(response: Any) -> dict:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]


# --- completions -------------------------------------------------------------------------------
def test_chat_completion_is_stored_with_its_provenance(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        r = a.chat(seed=7, temperature=0.8, top_p=0.9, n=2)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert body["model_version"] == served.version == model_version(served.model)
        ids = [c["completion_id"] for c in body["choices"]]
        assert len(set(ids)) == 2 and all(i.startswith(body["id"]) for i in ids)
        assert body["usage"]["completion_tokens"] == sum(len(a.store.get_completion(i).completion_token_ids) for i in ids)
        for choice in body["choices"]:
            row = a.store.get_completion(choice["completion_id"])
            assert row.completion_text == choice["message"]["content"]
            assert row.model_version == served.version and row.model_name == "tiny"
            assert row.rendered_prompt == served.render_chat(HI) and row.prompt_messages == HI
            assert row.sampling == {"temperature": 0.8, "top_p": 0.9, "max_tokens": 8, "stop": [], "seed": 7, "n": 2}
            assert row.prompt_tokens == len(served.encode(row.rendered_prompt, add_special_tokens=False))
            assert served.tokenizer.decode(row.completion_token_ids, skip_special_tokens=True) == row.completion_text
            assert row.latency_ms > 0 and row.ttft_ms is not None and row.ttft_ms <= row.latency_ms
        # The recorded seed redraws the same samples.
        again = a.chat(seed=7, temperature=0.8, top_p=0.9, n=2).json()
        assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in body["choices"]]


def test_streamed_chat_equals_the_stored_completion(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        body = {"model": "tiny", "messages": HI, "max_tokens": 12, "seed": 3, "stream": True, "stream_options": {"include_usage": True}}
        with a.client.stream("POST", "/v1/chat/completions", json=body, headers=a.auth()) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[-1]["usage"]["completion_tokens"] >= 1
        row = a.store.get_completion(chunks[0]["choices"][0]["completion_id"])
        assert row.completion_text == text
        whole = a.chat(max_tokens=12, seed=3).json()  # the same seed, not streamed: the same text
        assert whole["choices"][0]["message"]["content"] == text



def test_stream_interval_sends_tokens_in_chunks(db_url: str, tiny_model_dir: Path) -> None:
    """With ``stream_interval`` 4 the loop is woken every 4th decode step (and at once for the
    first token and the end): fewer SSE chunks than tokens, the same text."""
    served = ServedModel("tiny", str(tiny_model_dir), stream_interval=4)
    with api(db_url, served) as a:
        body = {"model": "tiny", "messages": HI, "max_tokens": 24, "seed": 5, "stream": True, "temperature": 1.0}
        with a.client.stream("POST", "/v1/chat/completions", json=body, headers=a.auth()) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
        text = "".join(p for p in pieces if p)
        tokens = len(a.store.get_completion(chunks[0]["choices"][0]["completion_id"]).completion_token_ids)
        assert tokens >= 8
        assert len([p for p in pieces if p]) <= tokens // 4 + 2  # first token, every 4th step, the end
        whole = a.chat(max_tokens=24, seed=5, temperature=1.0).json()
        assert whole["choices"][0]["message"]["content"] == text


def test_completions_endpoint_and_stop_strings(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        plain = {"model": "tiny", "prompt": "I went to the park and", "max_tokens": 16, "temperature": 0}
        r = a.client.post("/v1/completions", json=plain, headers=a.auth())
        assert r.status_code == 200, r.text
        full = r.json()["choices"][0]["text"]
        assert r.json()["object"] == "text_completion" and len(full.strip()) >= 6
        stop = full.strip()[2:4]
        cut = a.client.post("/v1/completions", json={**plain, "stop": [stop]}, headers=a.auth()).json()["choices"][0]
        assert cut["text"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"
        assert a.store.get_completion(cut["completion_id"]).prompt_text == plain["prompt"]
        with a.client.stream("POST", "/v1/completions", json={**plain, "stop": stop, "stream": True}, headers=a.auth()) as s:
            pieces = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(p["choices"][0]["text"] for p in pieces) == cut["text"]


def test_text_stream_holds_back_a_possible_stop_string(builtin_tok: Any) -> None:
    ids = builtin_tok("hello there friend", add_special_tokens=False)["input_ids"]
    stream = TextStream(builtin_tok, ["there"])
    shown = "".join(stream.push(i) for i in ids) + stream.flush()
    assert shown == "hello " and stream.stopped
    stream = TextStream(builtin_tok, [])
    assert "".join(stream.push(i) for i in ids) + stream.flush() == "hello there friend"


def test_text_stream_shows_what_a_full_decode_gives(builtin_tok: Any) -> None:
    """Token by token (the incremental decoder) or all at once, the text is the same: for random
    ids, special tokens and bytes of split characters included, what is shown adds up to
    ``tokenizer.decode``, cut at the first stop string, and nothing past it is shown."""
    import random

    rng = random.Random(0)
    emoji = builtin_tok("café 🙂 naïve", add_special_tokens=False)["input_ids"]  # multi-byte characters split over tokens
    for trial in range(200):
        ids = [rng.randrange(len(builtin_tok)) for _ in range(rng.randint(1, 30))]
        if trial % 3 == 0:
            ids[rng.randrange(len(ids)):rng.randrange(len(ids)) + 1] = emoji[: rng.randint(1, len(emoji))]
        full = builtin_tok.decode(ids, skip_special_tokens=True)
        stop = [full[len(full) // 2 : len(full) // 2 + 2]] if trial % 2 and len(full) > 4 else []
        stream = TextStream(builtin_tok, stop)
        shown = ""
        for i in ids:
            shown += stream.push(i)
            if stream.stopped:
                break
        shown += stream.flush()
        expected = full[: full.find(stop[0])] if stop else full
        assert shown == expected == stream.text, (ids, stop)
        assert "\ufffd" not in shown[:-1] or "\ufffd" in full


def test_model_names() -> None:
    assert parse_model_spec("runs/sft/final") == ("sft", "runs/sft/final")
    assert parse_model_spec("a=runs/sft/final") == ("a", "runs/sft/final")
    assert parse_model_spec("org/model-7b") == ("model-7b", "org/model-7b")


# --- feedback ----------------------------------------------------------------------------------
def test_every_feedback_kind_round_trips(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        c1, c2 = a.completion_id(seed=1), a.completion_id(seed=2)
        sent = [
            {"kind": "thumbs", "completion_id": c1, "up": True, "comment": "nice", "tags": ["polite"]},
            {"kind": "rating", "completion_id": c1, "rating": 4},
            {"kind": "pairwise", "completion_id": c1, "other_completion_id": c2, "verdict": "b", "left": "b"},
            {"kind": "correction", "completion_id": c2, "correction": "Hello! I am well, thank you."},
        ]
        for body in sent:
            r = a.feedback(**body)
            assert r.status_code == 201, r.text
            got = r.json()
            assert got["outcome"] == "created" and got["revision"] == 1
            assert {k: got[k] for k in body} == body
            assert got["model_version"] == served.version
        listed = a.client.get("/v1/feedback", headers=a.auth()).json()["data"]
        assert sorted(f["kind"] for f in listed) == ["correction", "pairwise", "rating", "thumbs"]
        assert {f["completion_text"] for f in listed} >= {a.store.get_completion(c1).completion_text}
        only = a.client.get("/v1/feedback?kind=rating", headers=a.auth()).json()["data"]
        assert [f["rating"] for f in only] == [4]


def test_a_second_vote_replaces_the_first_and_retries_are_idempotent(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        c = a.completion_id()
        first = a.feedback(kind="thumbs", completion_id=c, up=True, key="k1")
        assert first.status_code == 201
        replay = a.feedback(kind="thumbs", completion_id=c, up=True, key="k1")
        assert replay.status_code == 200 and replay.json()["outcome"] == "replayed" and replay.json()["id"] == first.json()["id"]
        second = a.feedback(kind="thumbs", completion_id=c, up=False, key="k2")
        assert second.status_code == 200 and second.json()["outcome"] == "replaced"
        assert second.json()["id"] == first.json()["id"] and second.json()["revision"] == 2
        thumbs = a.client.get("/v1/feedback?kind=thumbs", headers=a.auth()).json()["data"]
        assert [(f["up"], f["revision"]) for f in thumbs] == [(False, 2)]
        conflict = a.feedback(kind="thumbs", completion_id=c, up=True, key="k2")
        assert conflict.status_code == 409 and error_of(conflict)["param"] == "Idempotency-Key"


def test_a_batch_of_feedback_answers_each_item_and_commits_the_good_ones_together(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        c1, c2, bobs = a.completion_id(seed=1), a.completion_id(seed=2), a.completion_id("bob")
        items = [
            {"kind": "thumbs", "completion_id": c1, "up": True, "idempotency_key": "b1"},
            {"kind": "rating", "completion_id": c1, "rating": 5},
            {"kind": "thumbs", "completion_id": bobs, "up": False},  # someone else's answer
            {"kind": "pairwise", "completion_id": c1, "other_completion_id": c2, "verdict": "a", "left": "a"},
            {"kind": "thumbs", "completion_id": c1, "up": False},  # the same vote again: replaces the first
            {"kind": "thumbs", "completion_id": "cmpl-missing", "up": True},
        ]
        batches_before = a.store._writer.batches
        r = a.client.post("/v1/feedback/batch", json={"items": items}, headers=a.auth())
        assert r.status_code == 200, r.text
        got = r.json()["data"]
        assert [g["status"] for g in got] == [201, 201, 404, 201, 200, 404]
        assert got[2]["error"]["param"] == "completion_id" and got[2]["feedback"] is None
        assert got[4]["feedback"]["outcome"] == "replaced" and got[4]["feedback"]["id"] == got[0]["feedback"]["id"]
        assert a.store._writer.batches - batches_before <= 2  # queued together: one or two transactions, not four
        listed = a.client.get("/v1/feedback", headers=a.auth()).json()["data"]
        assert sorted((f["kind"], f["revision"]) for f in listed) == [("pairwise", 1), ("rating", 1), ("thumbs", 2)]
        # A retried item with its idempotency key is replayed, not written again.
        retry = a.client.post("/v1/feedback/batch", json={"items": items[:1]}, headers=a.auth()).json()["data"][0]
        assert retry["status"] == 200 and retry["feedback"]["outcome"] == "replayed" and retry["feedback"]["up"] is True
        # A bad item is answered on its own (422 naming its place) and the others go ahead.
        mixed = a.client.post("/v1/feedback/batch", json={"items": [items[1], {**items[1], "rating": 9}]}, headers=a.auth())
        assert [item["status"] for item in mixed.json()["data"]] == [200, 422]
        assert mixed.json()["data"][1]["error"]["param"] == "items[1].rating"
        assert a.client.post("/v1/feedback/batch", json={"items": "x"}, headers=a.auth()).status_code == 422
        assert a.client.post("/v1/feedback/batch", json={"items": []}, headers=a.auth()).status_code == 422
        assert a.client.post("/v1/feedback/batch", json={"items": items}).status_code == 401


def test_users_see_and_change_only_their_own_feedback(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        anns = a.completion_id("ann")
        r = a.feedback("bob", kind="thumbs", completion_id=anns, up=False)
        assert r.status_code == 404 and error_of(r)["param"] == "completion_id"
        mine = a.feedback("ann", kind="thumbs", completion_id=anns, up=True).json()["id"]
        assert a.client.get(f"/v1/feedback/{mine}", headers=a.auth("bob")).status_code == 404
        assert a.client.delete(f"/v1/feedback/{mine}", headers=a.auth("bob")).status_code == 404
        assert a.client.get("/v1/feedback", headers=a.auth("bob")).json()["data"] == []
        assert a.client.get(f"/v1/feedback/{mine}", headers=a.auth("ann")).json()["up"] is True
        assert a.client.delete(f"/v1/feedback/{mine}", headers=a.auth("ann")).status_code == 204
        assert a.client.get(f"/v1/feedback/{mine}", headers=a.auth("ann")).status_code == 404


def test_auth_is_required_and_export_is_for_admins(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        assert a.client.get("/health").status_code == 200
        assert a.client.get("/openapi.json").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic xyz"}):
            r = a.client.get("/v1/models", headers=headers)
            assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
        assert a.client.get("/v1/me", headers=a.auth("bob")).json() == {"id": 2, "name": "bob", "admin": False, "auth": True}
        c1, c2 = a.completion_id(seed=1), a.completion_id(seed=2)
        a.feedback(kind="pairwise", completion_id=c1, other_completion_id=c2, verdict="a", left="a")
        assert a.client.get("/admin/export?kind=pairs", headers=a.auth("ann")).status_code == 403
        r = a.client.get("/admin/export?kind=pairs", headers=a.auth("root"))
        assert r.status_code == 200
        rows = [json.loads(line) for line in r.text.splitlines()]
        assert len(rows) == 1
        assert rows[0]["chosen"][0]["content"] == a.store.get_completion(c1).completion_text
        assert rows[0]["prompt"] == HI


def test_no_auth_mode_is_the_anonymous_user(db_url: str, served: ServedModel) -> None:
    with api(db_url, served, auth=False) as a:
        me = a.client.get("/v1/me").json()
        assert me["name"] == "anonymous" and me["auth"] is False
        assert a.client.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 2}).status_code == 200


def test_the_store_is_a_dependency_a_test_can_swap(db_url: str, served: ServedModel, tmp_path: Path) -> None:
    """With ``get_store`` overridden by a second database, keys are looked up, completions stored
    and feedback written there, and the app's own store sees none of it."""
    other_url = f"sqlite:///{tmp_path}/other.db"
    upgrade(other_url)
    with FeedbackStore(other_url) as other, api(db_url, served) as a:
        other.register_model(served.name, served.version, served.path)
        key = other.add_user("cat")
        a.client.app.dependency_overrides[get_store] = lambda: other
        assert a.chat().status_code == 401  # ann's key is in the app's store, not in this one
        headers = {"Authorization": f"Bearer {key}"}
        r = a.client.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 4}, headers=headers)
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]["completion_id"]
        assert a.client.post("/v1/feedback", json={"kind": "thumbs", "completion_id": c, "up": True}, headers=headers).status_code == 201
        assert other.get_completion(c) is not None and a.store.get_completion(c) is None
        cat = other.user_by_key(key)
        assert [(f.completion_id, f.up) for f in other.list_feedback(cat.id)] == [(c, True)]
        assert a.store.votes() == []


# --- limits and bad input ----------------------------------------------------------------------
def test_rate_limit_answers_429_with_retry_after(db_url: str, served: ServedModel) -> None:
    with api(db_url, served, rate_limit_per_minute=6, rate_burst=3) as a:
        codes = [a.client.get("/v1/models", headers=a.auth()).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = a.client.get("/v1/models", headers=a.auth())
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and error_of(r)["type"] == "rate_limit_error"
        assert a.client.get("/v1/models", headers=a.auth("bob")).status_code == 200  # per user


def test_caps_answer_413_and_422_naming_the_field(db_url: str, served: ServedModel) -> None:
    with api(db_url, served, max_body_bytes=2000, max_tokens_limit=64, default_max_tokens=16, max_n=2, max_prompt_tokens=40) as a:
        big = a.chat(messages=[{"role": "user", "content": "x" * 3000}])
        assert big.status_code == 413 and "2000 bytes" in error_of(big)["message"]
        long = a.chat(messages=[{"role": "user", "content": "hello " * 60}])
        assert long.status_code == 422 and error_of(long)["param"] == "messages" and "at most 40" in error_of(long)["message"]
        assert error_of(a.chat(max_tokens=65))["param"] == "max_tokens"
        assert error_of(a.chat(n=3))["param"] == "n"


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "nope", "messages": HI}, 404, "model"),
        ({"model": "tiny", "messages": HI, "temperature": "hot"}, 422, "temperature"),
        ({"model": "tiny", "messages": HI, "temperature": 3}, 422, "temperature"),
        ({"model": "tiny", "messages": []}, 422, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages[0].role"),
        ({"model": "tiny", "messages": HI, "n": "2"}, 422, "n"),
        ({"model": "tiny", "messages": HI, "stream": "yes"}, 422, "stream"),
        ({"messages": HI}, 422, "model"),
    ],
)
def test_bad_completion_requests(db_url: str, served: ServedModel, body: dict, status: int, param: str) -> None:
    with api(db_url, served) as a:
        r = a.client.post("/v1/chat/completions", json=body, headers=a.auth())
        assert r.status_code == status, r.text
        assert error_of(r)["param"] == param


def test_bad_feedback_requests(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        c = a.completion_id()
        cases = [
            ({"kind": "rating", "completion_id": c, "rating": 7}, 422, "rating"),
            ({"kind": "rating", "completion_id": c, "rating": 3.5}, 422, "rating"),
            ({"kind": "thumbs", "completion_id": "chatcmpl-missing-0", "up": True}, 404, "completion_id"),
            ({"kind": "pairwise", "completion_id": c, "other_completion_id": c, "verdict": "a", "left": "a"}, 422, "other_completion_id"),
            ({"kind": "pairwise", "completion_id": c, "other_completion_id": "x", "verdict": "a", "left": "a"}, 404, "other_completion_id"),
            ({"kind": "correction", "completion_id": c, "correction": "   "}, 422, "correction"),
            ({"kind": "thumbs", "completion_id": c, "up": "yes"}, 422, "up"),
            ({"kind": "stars", "completion_id": c}, 422, "kind"),
            ({"kind": "thumbs", "completion_id": c, "up": True, "extra": 1}, 422, "extra"),
        ]
        for body, status, param in cases:
            r = a.feedback(**body)
            assert (r.status_code, error_of(r)["param"]) == (status, param), (body, r.text)
        r = a.client.post("/v1/feedback", content=b'{"kind": "thumbs",', headers={**a.auth(), "Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
        assert a.client.get("/v1/feedback/abc", headers=a.auth()).status_code == 422
        assert a.client.get("/v1/feedback", headers=a.auth()).json()["data"] == []  # nothing half-written


# --- redeploy ----------------------------------------------------------------------------------
def test_redeploy_under_a_running_stream(db_url: str, tiny_model_dir: Path, other_model_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    served = ServedModel("tiny", str(tiny_model_dir))  # its own: the redeploy stops it
    step, steps, deployed = served.batcher.step, [], threading.Event()

    def held_step(*args: Any, **kwargs: Any) -> None:  # after the first token, held until the deploy is done
        steps.append(1)
        if len(steps) > 1:
            deployed.wait(timeout=30)
        step(*args, **kwargs)

    monkeypatch.setattr(served.batcher, "step", held_step)
    with api(db_url, served) as a:
        old_version = served.version
        body = {"model": "tiny", "messages": HI, "max_tokens": 100, "seed": 1, "stream": True}
        with a.client.stream("POST", "/v1/chat/completions", json=body, headers=a.auth()) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            assert a.client.post("/admin/deploy", json={"name": "tiny", "path": str(other_model_dir)}, headers=a.auth()).status_code == 403
            r = a.client.post("/admin/deploy", json={"name": "tiny", "path": str(other_model_dir)}, headers=a.auth("root"))
            assert r.status_code == 200, r.text
            assert r.json()["previous_version"] == old_version and r.json()["version"] != old_version
            assert served.batcher.load == 1  # the old model is still generating that stream
            deployed.set()
            rest = [line for line in lines if line.startswith("data: ")]
        # The stream that was running finished whole, on the weights it started with.
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in [first] + rest[:-1]]
        assert {c["model_version"] for c in chunks} == {old_version}
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        deadline = time.monotonic() + 10
        while served._thread.is_alive() and time.monotonic() < deadline:  # drained, the old decode thread ends
            time.sleep(0.05)
        assert not served._thread.is_alive()
        # The next completion carries the new version, and the registry says it is deployed.
        after = a.chat().json()
        assert after["model_version"] == r.json()["version"]
        assert [m["version"] for m in a.store.models() if m["deployed"]] == [after["model_version"]]
        bad = a.client.post("/admin/deploy", json={"name": "tiny", "path": "/no/such/folder"}, headers=a.auth("root"))
        assert bad.status_code == 400 and "/no/such/folder" in error_of(bad)["message"]
        assert a.chat().json()["model_version"] == after["model_version"]  # a failed deploy changes nothing
