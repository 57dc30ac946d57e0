"""The FastAPI app, composed: the shared serving state, middleware, error handlers, the routers
(OpenAI-compatible API, classify, feedback, admin) and the chat page.

Errors are OpenAI-shaped (:mod:`alignloop.serve.errors`); routes reach the store, the serving
state and the user through dependencies (:mod:`alignloop.serve.dependencies`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from alignloop.config import ServeConfig
from alignloop.feedback.store import FeedbackStore
from alignloop.serve import admin, classify_api, conversations_api, feedback_api, openai_api
from alignloop.serve.classifier import ServedClassifier
from alignloop.serve.dependencies import Serving
from alignloop.serve.engine import ServedModel
from alignloop.serve.errors import add_error_handlers
from alignloop.serve.limits import BodySizeLimit
from alignloop.serve.page import SecurityHeaders, mount_page
from alignloop.serve.replicas import RegistryFollower
from alignloop.serve.upstream import Upstream, UpstreamModel


def create_app(config: ServeConfig, store: FeedbackStore, models: Sequence[ServedModel | UpstreamModel],
               classifiers: Sequence[ServedClassifier] = (), upstream: Upstream | None = None) -> FastAPI:
    """The app; its lifespan starts the models' decode threads and the registry follower (the
    replicas on one database serve what was deployed last through any of them), and stops them
    (and closes the store) on shutdown. A gateway's ``upstream`` client is opened on the app's
    event loop and closed with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for m in models:
            m.start()
        if upstream is not None:
            upstream.open()
        follower = RegistryFollower(app.state.serving, config.registry_poll_seconds) if config.registry_poll_seconds > 0 else None
        if follower is not None:
            follower.start()
        try:
            yield
        finally:
            if follower is not None:
                follower.stop()
            for m in {*models, *app.state.serving.models.values()}:  # redeployed ones too
                m.stop()
            app.state.serving.key_lookups.shutdown(wait=False)
            if upstream is not None:
                await upstream.aclose()
            store.close()

    app = FastAPI(title="alignloop", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions with feedback capture (thumbs, ratings, comparisons, corrections).")
    app.state.serving = Serving(config, store, models, classifiers, upstream)
    add_error_handlers(app)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"])
    app.add_middleware(BodySizeLimit, limit=config.max_body_bytes)
    app.add_middleware(SecurityHeaders)  # outermost: a 413 from the size limit carries the headers too
    for router in (openai_api.router, classify_api.router, feedback_api.router, conversations_api.router, admin.router):
        app.include_router(router)
    mount_page(app)
    return app
