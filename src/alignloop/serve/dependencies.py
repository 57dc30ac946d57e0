"""What the routes depend on: the serving state, the feedback store and the user behind a request.

Routes take them as ``Depends(get_serving)``, ``Depends(get_store)`` and ``Depends(current_user)``,
so a test swaps any of them with ``app.dependency_overrides``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Optional

from fastapi import Depends, Header, Request

from alignloop.config import ServeConfig
from alignloop.feedback.store import FeedbackStore, User
from alignloop.models.load import model_family
from alignloop.rollout.exploration import parse_exploration
from alignloop.serve.classifier import ServedClassifier
from alignloop.serve.engine import ServedModel
from alignloop.serve.errors import ApiError
from alignloop.serve.limits import make_limiter
from alignloop.serve.upstream import Upstream, UpstreamModel, upstream_version


class Serving:
    """What the routes share: the config, the store, the chat models and classifiers, the
    exploration policy, the key cache and the limiter."""

    def __init__(self, config: ServeConfig, store: FeedbackStore, models: Sequence[ServedModel | UpstreamModel],
                 classifiers: Sequence[ServedClassifier] = (), upstream: Upstream | None = None) -> None:
        self.config, self.store = config, store
        self.upstream = upstream  # a gateway's: its chat models are UpstreamModels, deployed by model id
        self.models = {m.name: m for m in models}
        self.classifiers = {c.name: c for c in classifiers}
        self.exploration = parse_exploration(config.exploration)
        for m in [*models, *classifiers]:  # every completion and prediction row points at its model version
            store.register_model(m.name, m.version, m.path)
        self.started = int(time.time())
        # In this process, or shared by the replicas on the database (config.limits).
        self.limiter = make_limiter(config.limits, store, "requests", config.rate_limit_per_minute, config.rate_burst)
        # Tokens a minute per user, charged up front as n × max_tokens + prompt tokens (as hosted
        # APIs count): a minute's worth may be spent at once.
        self.token_budget = make_limiter(config.limits, store, "tokens", config.tokens_per_minute, config.tokens_per_minute)
        # Failed logins per client address: a guessed key costs the guesser, not the users.
        self.failed_logins = make_limiter(config.limits, store, "logins", config.auth_failures_per_minute, config.auth_failure_burst)
        self._deploying = threading.Lock()  # one deploy at a time: an admin's and the registry follower's
        self.anonymous: User | None = None if config.auth else store.ensure_user("anonymous", admin=True)
        # Key lookups get threads of their own: in Starlette's shared pool they would queue
        # behind the routes that hold a thread while their write commits.
        self.key_lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="key-lookup")
        # Keys verified before → their users: only the feedback writes trust it, and their
        # transaction checks the key again (see feedback_caller).
        self.known_keys: dict[str, User] = {}

    def remember_key(self, key: str, user: User) -> None:
        if len(self.known_keys) > 100_000:  # many keys: start over rather than grow without bound
            self.known_keys = {}
        self.known_keys[key] = user

    def forget_key(self, key: str | None) -> None:
        """A write found the key revoked: the next request looks it up again (and is refused)."""
        if key is not None:
            self.known_keys.pop(key, None)

    def deploy(self, name: str, path: str, record: bool = True,
               version: str | None = None) -> tuple[ServedModel | UpstreamModel | ServedClassifier, str | None]:
        """Load ``path`` and serve it as ``name`` from the next request on, without dropping any:
        requests already running finish on the old weights (their rows stay in the old batcher,
        whose thread stops once they are done). Marks the new version deployed in the registry
        (unless ``record`` is false: a replica following a deploy made elsewhere), which is how
        the other replicas on the database learn of it (:mod:`alignloop.serve.replicas`).
        Returns the new model and the version it replaced.

        A classifier's name (or a new name whose folder holds a classifier) is swapped the same
        way: one assignment of the name → model dict. A classifier keeps no state between
        requests, so a request that took the old one finishes on it and nothing needs draining.

        On a gateway (``--upstream``) ``path`` is the upstream's model id (a folder it loads, a Hub
        id, an adapter name) and ``version`` what its rows record (:func:`upstream_version`
        chooses when None); nothing is loaded here."""
        with self._deploying:
            if self.upstream is not None and name not in self.classifiers:
                return self._deploy_upstream(name, path, record, version)
            return self._deploy(name, path, record)

    def _deploy_upstream(self, name: str, model_id: str, record: bool, version: str | None) -> tuple[UpstreamModel, str | None]:
        """Point ``name`` at ``model_id`` on the upstream once the upstream answers with it (the
        probe loads it there), so no request is the first to wait for the load or to fail on a
        wrong id. Requests in flight hold the old model and finish on the old model id."""
        assert self.upstream is not None
        self.upstream.probe(model_id)
        new = UpstreamModel(name, model_id, upstream_version(self.store, name, model_id, version), self.upstream)
        old = self._put_in_place("models", name, new, model_id, record)
        return new, None if old is None else old.version

    def _put_in_place(self, table: str, name: str, new: Any, path: str, record: bool) -> Any:
        """Register ``new`` (serving ``path``) and swap it in for ``name`` in the ``table`` dict
        (``models`` or ``classifiers``) in one assignment, so a request sees the old dict or the
        new; mark it deployed when ``record``. Returns the model it replaced, or None."""
        self.store.register_model(name, new.version, path)
        served = getattr(self, table)
        setattr(self, table, {**served, name: new})
        if record:
            self.store.deploy(new.version)
        return served.get(name)

    def _deploy(self, name: str, path: str, record: bool) -> tuple[ServedModel | ServedClassifier, str | None]:
        if name in self.classifiers or (name not in self.models and model_family(path, "path")[0] == "classifier"):
            if name in self.models:
                raise ApiError(422, f"{name!r} is a chat model here; it cannot be replaced by a classifier", param="name")
            classifier = ServedClassifier.from_config(name, path, self.config)
            previous = self._put_in_place("classifiers", name, classifier, path, record)
            return classifier, None if previous is None else previous.version
        new = ServedModel.from_config(name, path, self.config)
        new.start()
        old = self._put_in_place("models", name, new, path, record)
        if old is not None and old is not new:
            threading.Thread(target=old.drain_and_stop, name=f"drain-{name}", daemon=True).start()
        return new, None if old is None else old.version

    def charge_completion(self, user: User, served: ServedModel | UpstreamModel, rows: int, tokens: int) -> None:
        """Admit ``rows`` completions of ``tokens`` (requested output plus prompt) for ``user`` on
        ``served``, or refuse with 429: too many of the user's rows already wait for the model,
        or the user's token budget for the minute is spent."""
        queued = served.queued_rows(user.id)
        if queued + rows > self.config.max_queued_rows_per_user:
            raise ApiError(429, f"{queued} of your completions already wait for {served.name!r}; at most "
                           f"{self.config.max_queued_rows_per_user} may wait per user (max_queued_rows_per_user): retry when some have run",
                           "rate_limit_error", headers={"Retry-After": "1"})
        wait = self.token_budget.retry_after(user.id, tokens)
        if wait is not None:
            raise ApiError(429, f"token budget: this request counts {tokens} tokens (n × max_tokens + prompt); a user may use "
                           f"{self.config.tokens_per_minute:g} a minute; retry in {wait:.1f} s",
                           "rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def classifier(self, name: str) -> ServedClassifier:
        if name in self.classifiers:
            return self.classifiers[name]
        if name in self.models:
            raise ApiError(422, f"model {name!r} is a chat model; /v1/classify serves {sorted(self.classifiers)} "
                           "(chat models answer on /v1/chat/completions)", param="model")
        raise ApiError(404, f"model {name!r} is not a classifier served here; GET /v1/models lists them "
                       f"({sorted(self.classifiers)})", "not_found_error", "model")

    def model(self, name: str) -> ServedModel | UpstreamModel:
        if name in self.classifiers:
            raise ApiError(422, f"model {name!r} is a classifier; send it to /v1/classify", param="model")
        if name not in self.models:
            raise ApiError(404, f"model {name!r} is not served here; GET /v1/models lists {sorted(self.models)}",
                           "not_found_error", "model")
        return self.models[name]


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


def get_store(serving: Serving = Depends(get_serving)) -> FeedbackStore:
    return serving.store


@dataclass(frozen=True)
class Caller:
    """The user behind a request and the API key it came with (None without auth)."""

    user: User
    key: str | None


async def current_user(request: Request, serving: Serving = Depends(get_serving), store: FeedbackStore = Depends(get_store),
                       authorization: Optional[str] = Header(None, include_in_schema=False)) -> User:
    """The user behind the request's ``Authorization: Bearer KEY``, after the rate limit.

    The key is looked up in the store on every request (an indexed read in a worker thread), so
    ``alignloop users revoke`` or ``rotate`` takes effect at the next request, also in a server
    that is already running. An address whose keys keep failing is refused (429) for a while
    before its keys are even looked at."""
    return (await _authenticate(request, serving, store, authorization, from_memory=False)).user


async def feedback_caller(request: Request, serving: Serving = Depends(get_serving), store: FeedbackStore = Depends(get_store),
                          authorization: Optional[str] = Header(None, include_in_schema=False)) -> Caller:
    """:func:`current_user` for the feedback writes, the server's hottest path: a key seen before
    is recognised from memory, and the write's own transaction checks it is still the user's
    (``api_key=`` of :meth:`FeedbackStore.put_feedback`), so a revoked key is still refused at
    its next request, without a read of its own (which cost 17% of the writes a second)."""
    return await _authenticate(request, serving, store, authorization, from_memory=True)


async def _authenticate(request: Request, serving: Serving, store: FeedbackStore, authorization: Optional[str],
                        from_memory: bool) -> Caller:
    """:func:`_admit` on the event loop when it costs no read (limits in memory, and no key or a
    key known from memory), else in a key-lookup thread: with shared limits (``--limits
    database``) its checks are statements on the database, made in one trip off the loop."""
    address = request.client.host if request.client else "unknown"
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip() if scheme.lower() == "bearer" and key.strip() else None
    reads = serving.limiter.shared or (serving.anonymous is None and key is not None
                                       and not (from_memory and key in serving.known_keys))
    if reads:
        return await asyncio.get_running_loop().run_in_executor(serving.key_lookups, _admit, serving, store, address, key, from_memory)
    return _admit(serving, store, address, key, from_memory)


def _admit(serving: Serving, store: FeedbackStore, address: str, key: str | None, from_memory: bool) -> Caller:
    """The caller with ``key`` (None: none sent, or not as ``Bearer KEY``), after the failed-login
    throttle of ``address`` and the user's request rate; or the ApiError (401, 429) that refuses it."""
    if serving.anonymous is not None:
        caller = Caller(serving.anonymous, None)
    else:
        wait = serving.failed_logins.wait(address)
        if wait is not None:
            raise ApiError(429, f"too many failed logins from this address; retry in {wait:.0f} s", "rate_limit_error",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if key is None:
            raise ApiError(401, "no API key: send `Authorization: Bearer KEY` (an admin creates one with `alignloop users add NAME`)",
                           "authentication_error")
        user = serving.known_keys.get(key) if from_memory else None
        if user is None:
            user = store.user_by_key(key)
            if user is None:
                serving.known_keys.pop(key, None)
                serving.failed_logins.retry_after(address)
                raise ApiError(401, "the API key is not valid", "authentication_error")
            serving.remember_key(key, user)
        caller = Caller(user, key)
    wait = serving.limiter.retry_after(caller.user.id)
    if wait is not None:
        raise ApiError(429, f"rate limit: at most {serving.config.rate_limit_per_minute:g} requests a minute per user; retry in {wait:.1f} s",
                       "rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return caller
