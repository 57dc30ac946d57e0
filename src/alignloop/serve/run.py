"""``alignloop serve``: open the store, load the models, register their versions, run uvicorn."""

from __future__ import annotations

import logging

from alignloop.config import ServeConfig
from alignloop.errors import ConfigError

log = logging.getLogger("alignloop")


def build_app(config: ServeConfig):  # -> FastAPI
    """The app for ``config``: the store (refuses an unmigrated schema), then each model loaded
    and its version registered."""
    from alignloop.feedback.store import FeedbackStore, resolve_db_url
    from alignloop.serve.app import create_app
    from alignloop.serve.engine import ServedModel, parse_model_spec

    if not config.models:
        raise ConfigError("serve: no model; give --model PATH (or NAME=PATH), e.g. --model runs/sft/final")
    specs = [parse_model_spec(spec) for spec in config.models]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"serve: two models are called the same ({names}); name them with --model NAME=PATH")
    url = resolve_db_url(config.db)
    store = FeedbackStore(url)
    models = []
    try:
        for name, path in specs:
            log.info("serve: loading %s from %s", name, path)
            served = ServedModel.from_config(name, path, config)
            log.info("serve: %s is version %s", name, served.version)
            models.append(served)
    except BaseException:
        store.close()
        raise
    if not config.auth:
        log.warning("serve: AUTH IS OFF (--no-auth): anyone who can reach %s:%d acts as the admin user 'anonymous'. "
                    "Use this only for a local demo.", config.host, config.port)
    return create_app(config, store, models)


def serve_forever(config: ServeConfig) -> None:
    import uvicorn

    app = build_app(config)
    log.info("serve: http://%s:%d/ (API under /v1, docs at /docs)", config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=10)
