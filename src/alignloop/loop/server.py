"""The server a loop talks to: a running ``alignloop serve`` reached by URL with an admin key, or
one the loop starts in this process (uvicorn in a thread) on the feedback database.

Either way the loop only uses the public HTTP API for what users and operators do (chat,
feedback, ``/admin/deploy``), and the database for what the server writes (votes, registry).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from alignloop.config import LoopConfig, ServeConfig
from alignloop.errors import ConfigError

log = logging.getLogger("alignloop")

ADMIN_NAME = "loop-admin"
START_TIMEOUT_S = 120.0
DEPLOY_TIMEOUT_S = 600.0  # loading a large model folder on the server can take minutes


@dataclass
class Server:
    """An HTTP handle on the serving process: the base URL and an admin's key."""

    url: str
    admin_key: str

    def client(self, key: str | None = None, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        # No cap on pooled connections: the simulated users share this client from 32 threads,
        # and httpcore's sync pool (1.0.9) may close a surplus keep-alive connection it has just
        # handed to a waiting request (encode/httpcore#1110): that request then fails with
        # "Bad file descriptor" or hangs to its timeout. With no surplus, nothing is closed.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, limits=limits)

    def served_version(self, name: str) -> str:
        """The version the server answers ``name`` with right now."""
        with self.client() as c:
            cards = _ok(c.get("/v1/models")).json()["data"]
        for card in cards:
            if card["id"] == name:
                return card["version"]
        raise ConfigError(f"model_name: the server at {self.url} does not serve {name!r}; it serves {[c['id'] for c in cards]}")

    def deploy(self, name: str, path: str) -> dict:
        """``POST /admin/deploy``: serve ``path`` as ``name`` from the next request on."""
        with self.client(timeout=DEPLOY_TIMEOUT_S) as c:
            return _ok(c.post("/admin/deploy", json={"name": name, "path": path})).json()


@contextmanager
def connect(cfg: LoopConfig, url: str) -> Iterator[Server]:
    """The server ``cfg`` names, or one started here for the loop's duration."""
    if cfg.server:
        server = Server(cfg.server.rstrip("/"), admin_key(cfg.admin_key, "admin_key"))
        server.served_version(cfg.model_name)  # fails early on a wrong URL, key or name
        yield server
        return
    if not cfg.base_model:
        raise ConfigError("base_model: the loop starts the server itself when `server` is not set; name the model it serves first")
    served = {"classifiers" if cfg.trains_classifier else "models": [f"{cfg.model_name}={cfg.base_model}"]}
    with local_server(ServeConfig(**served, db=url, port=cfg.port or free_port())) as server:
        yield server


@contextmanager
def local_server(config: ServeConfig) -> Iterator[Server]:
    """``alignloop serve`` with ``config`` in a background thread of this process (the database
    migrated first); yields once it answers, stops it on exit. The admin key is made for the
    occasion."""
    import uvicorn

    from alignloop.feedback.database import upgrade
    from alignloop.feedback.store import FeedbackStore
    from alignloop.serve.run import build_app

    upgrade(config.db)
    with FeedbackStore(config.db) as store:
        key = store.add_user(f"{ADMIN_NAME}-{os.getpid()}-{int(time.time())}", admin=True)
    app = build_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, name="alignloop-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the loop's server did not start on {config.host}:{config.port}")
        time.sleep(0.05)
    url = f"http://{config.host}:{config.port}"
    log.info("loop: serving %s at %s (database %s)", ", ".join(config.models), url, config.db)
    try:
        yield Server(url, key)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def admin_key(given: str | None, option: str) -> str:
    """``given``, else $ALIGNLOOP_ADMIN_KEY; deploying through /admin/deploy needs one."""
    key = given or os.environ.get("ALIGNLOOP_ADMIN_KEY")
    if not key:
        raise ConfigError(f"{option}: deploying through /admin/deploy needs an admin's key "
                          "(`alignloop users add NAME --admin`); give it or set $ALIGNLOOP_ADMIN_KEY")
    return key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ok(response: httpx.Response) -> Any:
    if response.status_code >= 300:
        raise RuntimeError(f"{response.request.method} {response.request.url} → {response.status_code}: {response.text[:300]}")
    return response
