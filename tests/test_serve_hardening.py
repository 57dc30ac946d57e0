"""The server against abuse and faults, in process (FastAPI's TestClient): input the store cannot
hold is a 422 naming the field before anything is generated, out-of-range ids are 422s, each
batch item is answered on its own, a chunked body over the cap is a 413, the page and API carry
security headers, failed logins are throttled per address, per-user token budgets and queue caps
answer 429, a dropped PostgreSQL connection is a 503 with Retry-After and then recovers, and
files people's data lives in are owner-only."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from conftest import PG_URL, alignloop_command, postgres_unreachable
from test_serve import HI, Api, api, error_of

from alignloop.config import ServeConfig
from alignloop.feedback.database import scratch_postgres_schema
from alignloop.feedback.store import FeedbackStore, upgrade
from alignloop.serve.app import create_app
from alignloop.serve.engine import ServedModel

NUL = "a\x00b"


@pytest.fixture
def db_url(migrated_sqlite_url: str) -> str:
    return migrated_sqlite_url


def completions_stored(a: Api) -> int:
    with a.store._engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM completions")).scalar()


# --- input the store cannot hold ---------------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": NUL}]}, "messages[0].content.str"),
    ("/v1/chat/completions", {"messages": HI, "conversation_id": NUL}, "conversation_id"),
    ("/v1/completions", {"prompt": NUL}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "stop": [NUL]}, "stop"),
])
def test_a_nul_character_is_refused_before_anything_is_generated(db_url: str, served: ServedModel, path: str, body: dict,
                                                                  param: str) -> None:
    with api(db_url, served) as a:
        r = a.client.post(path, json={"model": "tiny", "max_tokens": 4, **body}, headers=a.auth())
        assert r.status_code == 422, r.text
        assert error_of(r)["param"].startswith(param.split(".")[0]) and "NUL" in error_of(r)["message"]
        assert served.batcher.stats()["rows_queued"] == 0 and completions_stored(a) == 0


def test_feedback_ids_out_of_range_and_nul_in_feedback_are_422s(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        for method in ("get", "delete"):
            for bad in (2**63, -1, 0):
                r = a.client.request(method.upper(), f"/v1/feedback/{bad}", headers=a.auth())
                assert r.status_code == 422 and error_of(r)["param"] == "feedback_id", r.text
            assert a.client.request(method.upper(), f"/v1/feedback/{2**63 - 1}", headers=a.auth()).status_code == 404
        c = a.completion_id()
        for field, value in (("comment", NUL), ("tags", [NUL])):
            r = a.feedback(kind="thumbs", completion_id=c, up=True, **{field: value})
            assert r.status_code == 422 and error_of(r)["param"].startswith(field), r.text
        # The schema's limits are the store's: 32 tags of 64 characters pass, one more of either is a 422 at the schema.
        assert a.feedback(kind="thumbs", completion_id=c, up=True, tags=["t" * 64] * 32).status_code == 201
        for tags in (["t" * 65], ["t"] * 33):
            r = a.feedback(kind="thumbs", completion_id=c, up=True, tags=tags)
            assert r.status_code == 422 and error_of(r)["param"].startswith("tags"), r.text


def test_a_batch_with_a_bad_item_commits_exactly_the_good_ones(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        c1, c2 = a.completion_id(seed=1), a.completion_id(seed=2)
        items = [
            {"kind": "thumbs", "completion_id": c1, "up": True},
            {"kind": "thumbs", "completion_id": c2, "up": True, "comment": NUL},  # the store cannot hold it
            {"kind": "rating", "completion_id": c2, "rating": 9},  # out of range
            {"kind": "rating", "completion_id": c2, "rating": 4},
        ]
        r = a.client.post("/v1/feedback/batch", json={"items": items}, headers=a.auth())
        assert r.status_code == 200, r.text
        got = r.json()["data"]
        assert [g["status"] for g in got] == [201, 422, 422, 201]
        assert got[1]["error"]["param"] == "items[1].comment" and got[2]["error"]["param"] == "items[2].rating"
        stored = a.client.get("/v1/feedback", headers=a.auth()).json()["data"]
        assert sorted((f["kind"], f["completion_id"]) for f in stored) == [("rating", c2), ("thumbs", c1)]


def test_a_chunked_body_over_the_cap_is_a_413(db_url: str, served: ServedModel) -> None:
    with api(db_url, served, max_body_bytes=2_000) as a:
        def chunks(total: int) -> Iterator[bytes]:
            body = b'{"model": "tiny", "prompt": "' + b"x" * total + b'"}'
            for i in range(0, len(body), 500):
                yield body[i:i + 500]

        big = a.client.post("/v1/completions", content=chunks(5_000), headers={**a.auth(), "Content-Type": "application/json"})
        assert big.status_code == 413, big.text
        small = a.client.post("/v1/completions", content=chunks(10), headers={**a.auth(), "Content-Type": "application/json"})
        assert small.status_code == 200, small.text


def test_the_page_and_the_api_carry_security_headers(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        page = a.client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        for r in (page, a.client.get("/v1/models", headers=a.auth()), a.client.get("/v1/models")):
            assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert "content-security-policy" not in a.client.get("/docs").headers  # Swagger UI runs inline scripts from a CDN


def test_failed_logins_are_throttled_per_address(db_url: str, served: ServedModel) -> None:
    with api(db_url, served, auth_failures_per_minute=1, auth_failure_burst=3) as a:
        for _ in range(3):
            assert a.client.get("/v1/models", headers={"Authorization": "Bearer guess"}).status_code == 401
        r = a.client.get("/v1/models", headers={"Authorization": "Bearer guess"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # From this address even a right key waits now: guessing costs the guesser.
        assert a.client.get("/v1/models", headers=a.auth()).status_code == 429


def test_a_token_budget_per_user_answers_429(db_url: str, served: ServedModel) -> None:
    with api(db_url, served, tokens_per_minute=130, rate_limit_per_minute=0) as a:
        answers = [a.chat(max_tokens=20, n=2) for _ in range(3)]  # 40 tokens asked + the prompt's 18, each: two fit in 130
        assert [r.status_code for r in answers[:2]] == [200, 200], answers[0].text
        assert answers[2].status_code == 429 and "token budget" in error_of(answers[2])["message"], answers[2].text
        assert int(answers[2].headers["retry-after"]) >= 1
        assert a.chat("bob", max_tokens=20, n=2).status_code == 200  # budgets are per user


def test_a_users_queue_is_capped(db_url: str, served: ServedModel) -> None:
    with api(db_url, served, max_queued_rows_per_user=3, rate_limit_per_minute=0) as a:
        r = a.chat(n=4, max_tokens=2)
        assert r.status_code == 429 and "max_queued_rows_per_user" in error_of(r)["message"]
        assert a.chat(n=3, max_tokens=2).status_code == 200


def test_revoke_and_rotate_take_effect_at_the_next_request(db_url: str, served: ServedModel) -> None:
    with api(db_url, served) as a:
        assert a.client.get("/v1/me", headers=a.auth("bob")).status_code == 200
        a.store.revoke_user("bob")
        assert a.client.get("/v1/me", headers=a.auth("bob")).status_code == 401
        new = a.store.rotate_key("bob")
        assert a.client.get("/v1/me", headers={"Authorization": f"Bearer {new}"}).json()["name"] == "bob"
        old_ann = a.keys["ann"]
        a.store.rotate_key("ann")
        assert a.client.get("/v1/me", headers={"Authorization": f"Bearer {old_ann}"}).status_code == 401


# --- the store's faults ------------------------------------------------------------------------
@contextmanager
def postgres_api(served: ServedModel, application_name: str) -> Iterator[Api]:
    reason = postgres_unreachable()
    if reason:
        pytest.skip(reason)
    with scratch_postgres_schema(PG_URL, "alignloop_test") as url:
        url = f"{url}&application_name={application_name}"
        upgrade(url)
        store = FeedbackStore(url)
        keys = {"ann": store.add_user("ann")}
        with TestClient(create_app(ServeConfig(), store, [served])) as client:
            yield Api(client, store, keys)


def terminate_backends(application_name: str) -> int:
    engine = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        killed = conn.execute(sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                      "WHERE application_name = :name"), {"name": application_name}).scalar()
    engine.dispose()
    return killed


@pytest.mark.postgres
def test_a_killed_postgres_connection_is_a_503_then_the_server_recovers(served: ServedModel) -> None:
    name = f"alignloop_kill_{os.getpid()}"
    with postgres_api(served, name) as a:
        c = a.completion_id()
        assert a.feedback(kind="thumbs", completion_id=c, up=True).status_code == 201
        assert terminate_backends(name) >= 1  # every connection of the server: the writer's and the pool's
        first = a.feedback(kind="rating", completion_id=c, rating=3)
        assert first.status_code == 503, first.text
        assert first.headers["retry-after"] == "2" and error_of(first)["type"] == "service_unavailable_error"
        assert a.feedback(kind="rating", completion_id=c, rating=4).status_code == 201
        assert a.completion_id() and a.client.get("/v1/feedback", headers=a.auth()).status_code == 200
        listed = {f["kind"]: f for f in a.client.get("/v1/feedback", headers=a.auth()).json()["data"]}
        assert listed["rating"]["rating"] == 4 and listed["rating"]["revision"] == 1  # the refused write left nothing


@pytest.mark.postgres
def test_nul_is_refused_alike_on_postgres(served: ServedModel) -> None:
    with postgres_api(served, f"alignloop_nul_{os.getpid()}") as a:
        r = a.chat(messages=[{"role": "user", "content": NUL}])
        assert r.status_code == 422 and "NUL" in error_of(r)["message"]
        c = a.completion_id()
        r = a.client.post("/v1/feedback/batch", json={"items": [{"kind": "thumbs", "completion_id": c, "up": True, "comment": NUL},
                                                                {"kind": "thumbs", "completion_id": c, "up": False}]}, headers=a.auth())
        assert [item["status"] for item in r.json()["data"]] == [422, 201]


# --- files -------------------------------------------------------------------------------------
def test_the_database_and_exports_are_owner_only_and_durability_is_a_choice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/new.db"
    upgrade(url)
    assert stat.S_IMODE((tmp_path / "new.db").stat().st_mode) == 0o600
    with FeedbackStore(url, durability="full") as store, store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    with FeedbackStore(url) as store, store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    out = tmp_path / "pairs.jsonl"
    done = subprocess.run(alignloop_command("feedback", "export", "--kind", "pairs", "--out", str(out), "--db", url),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


@pytest.mark.parametrize("args", [
    ("feedback", "export", "--kind", "pairs", "--out", "{tmp}/a-file/out.jsonl"),  # a parent that is a file
    ("feedback", "export", "--kind", "pairs", "--out", "{tmp}"),  # a directory
])
def test_cli_file_errors_are_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    url = f"sqlite:///{tmp_path}/feedback.db"
    upgrade(url)
    (tmp_path / "a-file").write_text("x")
    done = subprocess.run(alignloop_command(*[a.format(tmp=tmp_path) for a in args], "--db", url), capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().startswith("alignloop: error:")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_users_revoke_and_rotate_from_the_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/feedback.db"
    upgrade(url)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(alignloop_command("users", *args, "--db", url), capture_output=True, text=True)

    key = cli("add", "ann").stdout.strip()
    with FeedbackStore(url) as store:
        assert store.user_by_key(key).name == "ann"
    assert cli("revoke", "ann").returncode == 0
    assert "none" in cli("list").stdout
    with FeedbackStore(url) as store:
        assert store.user_by_key(key) is None
    new = cli("rotate", "ann").stdout.strip()
    assert new.startswith("al-") and new != key
    with FeedbackStore(url) as store:
        assert store.user_by_key(new).name == "ann"
    missing = cli("revoke", "nobody")
    assert missing.returncode == 2 and "no user named 'nobody'" in missing.stderr


def test_a_revoked_key_cannot_write_feedback_even_when_the_server_knows_it(db_url: str, served: ServedModel) -> None:
    """Feedback writes recognise a key from memory; their transaction checks it again."""
    with api(db_url, served) as a:
        c = a.completion_id("bob")
        assert a.feedback("bob", kind="thumbs", completion_id=c, up=True).status_code == 201  # bob's key is known now
        a.store.revoke_user("bob")
        r = a.feedback("bob", kind="rating", completion_id=c, rating=2)
        assert r.status_code == 401 and error_of(r)["type"] == "authentication_error", r.text
        batch = a.client.post("/v1/feedback/batch", json={"items": [{"kind": "rating", "completion_id": c, "rating": 3}]},
                              headers=a.auth("bob"))
        assert batch.status_code == 401
        new = a.store.rotate_key("bob")
        mine = a.client.get("/v1/feedback", headers={"Authorization": f"Bearer {new}"}).json()["data"]
        assert [(f["kind"], f["up"]) for f in mine] == [("thumbs", True)]  # neither refused write left a row
