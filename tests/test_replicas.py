"""Several server replicas on one PostgreSQL behave as one service (``--limits database``): a
user's token budget and request rate, an address's failed logins, a key's revocation and the
deployed version hold across replicas. In process (two apps, each with its own store and model,
on one database), then as two real ``alignloop serve`` processes (slow)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import PG_URL, postgres_unreachable
from test_serve_process import cli, serving

from alignloop.config import ServeConfig
from alignloop.errors import ConfigError
from alignloop.feedback.database import scratch_postgres_schema
from alignloop.feedback.store import FeedbackStore, upgrade
from alignloop.serve.app import create_app
from alignloop.serve.engine import ServedModel

HI = [{"role": "user", "content": "Hello! What do you like to do?"}]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL schema."""
    reason = postgres_unreachable()
    if reason:
        pytest.skip(reason)
    with scratch_postgres_schema(PG_URL, "alignloop_replicas") as url:
        upgrade(url)
        yield url


class Replica:
    """One replica through its client (TestClient in process, httpx against a process)."""

    def __init__(self, client: Any, keys: dict[str, str]) -> None:
        self.client, self.keys = client, keys

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}

    def chat(self, user: str, **body: Any) -> Any:
        return self.client.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 20, **body},
                                headers=self.auth(user))

    def version(self) -> str:
        [card] = self.client.get("/v1/models", headers=self.auth("root")).json()["data"]
        return card["version"]


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def spend_on_one_refused_on_the_other(one: Replica, two: Replica) -> None:
    """130 tokens a minute; a chat with n=2, max_tokens=20 counts 40 + the prompt's 18."""
    assert [one.chat("ann", n=2).status_code for _ in range(2)] == [200, 200]
    refused = two.chat("ann", n=2)
    assert refused.status_code == 429 and "token budget" in refused.json()["error"]["message"], refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert two.chat("bob", n=2).status_code == 200  # budgets are per user


LIMITS = {"limits": "database", "tokens_per_minute": 130, "rate_limit_per_minute": 0, "auth_failures_per_minute": 1,
          "auth_failure_burst": 3, "registry_poll_seconds": 0.2}


@contextmanager
def two_replicas(url: str, model_dir: Path, **config: Any) -> Iterator[tuple[Replica, Replica]]:
    with FeedbackStore(url) as store:
        keys = {"root": store.add_user("root", admin=True), "ann": store.add_user("ann"), "bob": store.add_user("bob")}
    with ExitStack() as stack:
        replicas = []
        for _ in range(2):  # each its own store and weights, as two processes have
            app = create_app(ServeConfig(**{**LIMITS, **config}), FeedbackStore(url), [ServedModel("tiny", str(model_dir))])
            replicas.append(Replica(stack.enter_context(TestClient(app)), keys))
        yield replicas[0], replicas[1]


@pytest.mark.postgres
def test_two_replicas_share_budgets_logins_revocation_and_the_deployed_version(pg_url: str, tiny_model_dir: Path,
                                                                              other_model_dir: Path) -> None:
    with two_replicas(pg_url, tiny_model_dir) as (one, two):
        spend_on_one_refused_on_the_other(one, two)

        for _ in range(3):  # the address's burst of failed logins, spent on replica 1
            assert one.client.get("/v1/me", headers={"Authorization": "Bearer guess"}).status_code == 401
        assert two.client.get("/v1/me", headers={"Authorization": "Bearer guess"}).status_code == 429

        with FeedbackStore(pg_url) as store:
            store.sweep_buckets("logins:", 0)  # the address may log in again (its bucket dropped = full)
        completion = one.chat("bob", max_tokens=4).json()["choices"][0]["completion_id"]
        vote = {"kind": "thumbs", "completion_id": completion, "up": True}
        # Feedback on replica 1's completion through replica 2 (no stickiness), which now knows bob's key.
        assert two.client.post("/v1/feedback", json=vote, headers=two.auth("bob")).status_code == 201
        assert one.client.post("/admin/users/bob/revoke", headers=one.auth("root")).status_code == 200
        assert two.client.get("/v1/me", headers=two.auth("bob")).status_code == 401
        assert two.client.post("/v1/feedback", json={**vote, "up": False}, headers=two.auth("bob")).status_code == 401

        v0 = two.version()
        deployed = one.client.post("/admin/deploy", json={"name": "tiny", "path": str(other_model_dir)}, headers=one.auth("root"))
        v1 = deployed.json()["version"]
        assert deployed.status_code == 200 and v1 != v0 and one.version() == v1
        assert eventually(lambda: two.version() == v1), "replica 2 did not follow the deploy"
        assert two.chat("root", max_tokens=4).json()["model_version"] == v1
        rollback = two.client.post(f"/admin/models/{v0}/deploy", headers=two.auth("root"))  # and back, the other way
        assert rollback.status_code == 200 and two.version() == v0
        assert eventually(lambda: one.version() == v0), "replica 1 did not follow the rollback"


@pytest.mark.postgres
def test_a_shared_bucket_is_never_overspent_by_concurrent_takers(pg_url: str) -> None:
    """Eight threads (eight connections) take 20 times each from one bucket of 50 that refills
    at one token an hour: exactly 50 takes are granted."""
    from alignloop.serve.limits import SharedRateLimiter

    with FeedbackStore(pg_url) as store:
        limiter = SharedRateLimiter(store, "requests", per_minute=1 / 60, burst=50)
        granted: list[bool] = []

        def taker() -> None:
            granted.extend(limiter.retry_after(7) is None for _ in range(20))

        threads = [threading.Thread(target=taker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(granted) == 50 and len(granted) == 160
        wait = limiter.wait(7)
        assert wait is not None and 0 < wait <= 3600
        assert limiter.wait(8) is None  # another key: a full bucket


def test_shared_limits_need_postgresql(migrated_sqlite_url: str, served: ServedModel) -> None:
    with FeedbackStore(migrated_sqlite_url) as store, pytest.raises(ConfigError, match="limits: 'database'.*PostgreSQL"):
        create_app(ServeConfig(limits="database"), store, [served])


def test_a_deploy_made_by_the_cli_reaches_a_running_server(migrated_sqlite_url: str, tiny_model_dir: Path,
                                                          other_model_dir: Path) -> None:
    """`alignloop deploy VERSION` (no --server) changes the registry; the server follows it."""
    from alignloop.cli import main

    store = FeedbackStore(migrated_sqlite_url)
    key = store.add_user("root", admin=True)
    app = create_app(ServeConfig(registry_poll_seconds=0.2), store, [ServedModel("tiny", str(tiny_model_dir))])
    with TestClient(app) as client:
        replica = Replica(client, {"root": key})
        other = ServedModel("tiny", str(other_model_dir))
        with FeedbackStore(migrated_sqlite_url) as cli_store:
            cli_store.register_model("tiny", other.version, str(other_model_dir))
        assert main(["deploy", other.version, "--db", migrated_sqlite_url]) == 0
        assert eventually(lambda: replica.version() == other.version), "the server did not follow the registry"


# --- two real processes ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.postgres
def test_two_serve_processes_on_one_postgres_behave_as_one_service(pg_url: str, tiny_model_dir: Path,
                                                                   other_model_dir: Path) -> None:
    keys = {name: cli("users", "add", name, "--db", pg_url, *(["--admin"] if name == "root" else [])) for name in ("root", "ann", "bob")}
    options = [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]
    with serving(tiny_model_dir, pg_url, *options) as p1, serving(tiny_model_dir, pg_url, *options) as p2, \
            httpx.Client(base_url=p1.url, timeout=60) as c1, httpx.Client(base_url=p2.url, timeout=60) as c2:
        one, two = Replica(c1, keys), Replica(c2, keys)
        spend_on_one_refused_on_the_other(one, two)

        assert two.client.get("/v1/me", headers=two.auth("bob")).json()["name"] == "bob"
        cli("users", "revoke", "bob", "--db", pg_url)
        assert two.client.get("/v1/me", headers=two.auth("bob")).status_code == 401
        assert one.client.get("/v1/me", headers=one.auth("bob")).status_code == 401

        v0 = two.version()
        deployed = one.client.post("/admin/deploy", json={"name": "tiny", "path": str(other_model_dir)}, headers=one.auth("root"))
        assert deployed.status_code == 200, deployed.text
        v1 = deployed.json()["version"]
        assert v1 != v0 and eventually(lambda: two.version() == v1), "replica 2 did not follow the deploy"
        assert two.chat("ann", max_tokens=4).status_code == 429  # still ann's spent budget, after the switch too
        assert two.chat("root", max_tokens=4).json()["model_version"] == v1


def test_serve_refuses_shared_limits_on_sqlite_before_loading_a_model(migrated_sqlite_url: str, tiny_model_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from alignloop.serve import engine
    from alignloop.serve.run import build_app

    monkeypatch.setattr(engine.ServedModel, "from_config", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match="limits: 'database'.*PostgreSQL"):
        build_app(ServeConfig(models=[f"tiny={tiny_model_dir}"], db=migrated_sqlite_url, limits="database"))
