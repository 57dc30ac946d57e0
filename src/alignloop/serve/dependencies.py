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
from typing import Optional

from fastapi import Depends, Header, Request

from alignloop.config import ServeConfig
from alignloop.feedback.store import FeedbackStore, User
from alignloop.models.load import model_family
from alignloop.rollout.exploration import parse_exploration
from alignloop.serve.classifier import ServedClassifier
from alignloop.serve.engine import ServedModel
from alignloop.serve.errors import ApiError
from alignloop.serve.limits import RateLimiter


class Serving:
    """What the routes share: the config, the store, the chat models and classifiers, the
    exploration policy, the key cache and the limiter."""

    def __init__(self, config: ServeConfig, store: FeedbackStore, models: Sequence[ServedModel],
                 classifiers: Sequence[ServedClassifier] = ()) -> None:
        self.config, self.store = config, store
        self.models = {m.name: m for m in models}
        self.classifiers = {c.name: c for c in classifiers}
        self.exploration = parse_exploration(config.exploration)
        for m in [*models, *classifiers]:  # every completion and prediction row points at its model version
            store.register_model(m.name, m.version, m.path)
        self.started = int(time.time())
        self.limiter = RateLimiter(config.rate_limit_per_minute, config.rate_burst)
        # Tokens a minute per user, charged up front as n × max_tokens + prompt tokens (as hosted
        # APIs count): a minute's worth may be spent at once.
        self.token_budget = RateLimiter(config.tokens_per_minute, config.tokens_per_minute)
        # Failed logins per client address: a guessed key costs the guesser, not the users.
        self.failed_logins = RateLimiter(config.auth_failures_per_minute, config.auth_failure_burst)
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

    def deploy(self, name: str, path: str) -> tuple[ServedModel | ServedClassifier, str | None]:
        """Load ``path`` and serve it as ``name`` from the next request on, without dropping any:
        requests already running finish on the old weights (their rows stay in the old batcher,
        whose thread stops once they are done). Marks the new version deployed in the registry.
        Returns the new model and the version it replaced.

        A classifier's name (or a new name whose folder holds a classifier) is swapped the same
        way: one assignment of the name → model dict. A classifier keeps no state between
        requests, so a request that took the old one finishes on it and nothing needs draining."""
        if name in self.classifiers or (name not in self.models and model_family(path, "path")[0] == "classifier"):
            if name in self.models:
                raise ApiError(422, f"{name!r} is a chat model here; it cannot be replaced by a classifier", param="name")
            classifier = ServedClassifier.from_config(name, path, self.config)
            self.store.register_model(name, classifier.version, path)
            previous = self.classifiers.get(name)
            self.classifiers = {**self.classifiers, name: classifier}  # one assignment: a request sees the old dict or the new
            self.store.deploy(classifier.version)
            return classifier, None if previous is None else previous.version
        config = self.config
        new = ServedModel.from_config(name, path, config)
        self.store.register_model(name, new.version, path)
        new.start()
        old = self.models.get(name)
        self.models = {**self.models, name: new}  # one assignment: a request sees the old dict or the new
        self.store.deploy(new.version)
        if old is not None and old is not new:
            threading.Thread(target=old.drain_and_stop, name=f"drain-{name}", daemon=True).start()
        return new, None if old is None else old.version

    def charge_completion(self, user: User, served: ServedModel, rows: int, tokens: int) -> None:
        """Admit ``rows`` completions of ``tokens`` (requested output plus prompt) for ``user`` on
        ``served``, or refuse with 429: too many of the user's rows already wait for the model,
        or the user's token budget for the minute is spent."""
        queued = served.batcher.queued_rows(user.id)
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

    def model(self, name: str) -> ServedModel:
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
    if serving.anonymous is not None:
        caller = Caller(serving.anonymous, None)
    else:
        address = request.client.host if request.client else "unknown"
        wait = serving.failed_logins.wait(address)
        if wait is not None:
            raise ApiError(429, f"too many failed logins from this address; retry in {wait:.0f} s", "rate_limit_error",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "no API key: send `Authorization: Bearer KEY` (an admin creates one with `alignloop users add NAME`)",
                           "authentication_error")
        user = serving.known_keys.get(key) if from_memory else None
        if user is None:
            user = await asyncio.get_running_loop().run_in_executor(serving.key_lookups, store.user_by_key, key)
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
