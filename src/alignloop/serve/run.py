"""``alignloop serve``: open the store, load the models and classifiers, register their versions, run uvicorn."""

from __future__ import annotations

import logging

from alignloop.config import ServeConfig
from alignloop.errors import ConfigError

log = logging.getLogger("alignloop")


def build_app(config: ServeConfig):  # -> FastAPI
    """The app for ``config``: the store (refuses an unmigrated schema), then each model loaded
    and its version registered. A gateway (``config.upstream``) loads none: its chat models are
    the upstream's, by model id (:mod:`alignloop.serve.upstream`)."""
    from alignloop.feedback.store import FeedbackStore, resolve_db_url
    from alignloop.serve.app import create_app
    from alignloop.serve.engine import ServedModel, parse_model_spec
    from alignloop.serve.limits import require_limits_backend

    from alignloop.rollout.exploration import parse_exploration
    from alignloop.serve.classifier import ServedClassifier
    from alignloop.serve.upstream import Upstream, UpstreamModel, upstream_version

    if not config.models and not config.classifiers and not config.upstream:
        raise ConfigError("serve: no model; give --model PATH (or NAME=PATH), e.g. --model runs/sft/final, "
                          "or --classifier NAME=PATH")
    parse_exploration(config.exploration)  # a typo fails here, before any model is loaded
    specs, routed = _route_models([parse_model_spec(spec) for spec in config.models])
    classifier_specs = [parse_model_spec(spec) for spec in config.classifiers] + routed
    upstream = Upstream.from_config(config) if config.upstream else None
    upstream_specs = []
    if upstream is not None:
        upstream_specs = [parse_model_spec(spec) for spec in config.upstream_models] or [(i, i) for i in upstream.model_ids()]
        if not upstream_specs:
            raise ConfigError(f"upstream_models: {upstream.url} lists no model on GET /models; name the one to serve with "
                              "--upstream-model [NAME=]ID (transformers serve lists a model only once it is loaded)")
    names = [name for name, _ in specs + classifier_specs + upstream_specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"serve: two models are called the same ({names}); name them with --model NAME=PATH "
                          "or --classifier NAME=PATH")
    url = resolve_db_url(config.db)
    store = FeedbackStore(url, durability=config.db_durability)
    models, classifiers = [], []
    try:
        require_limits_backend(config.limits, store.backend)  # before any model is loaded
        for name, model_id in upstream_specs:
            served = UpstreamModel(name, model_id, upstream_version(store, name, model_id), upstream)
            log.info("serve: %s goes to %s as model %s, version %s", name, upstream.url, model_id, served.version)
            models.append(served)
        for name, path in specs:
            log.info("serve: loading %s from %s", name, path)
            served = ServedModel.from_config(name, path, config)
            log.info("serve: %s is version %s", name, served.version)
            models.append(served)
        for name, path in classifier_specs:
            log.info("serve: loading classifier %s from %s", name, path)
            classifier = ServedClassifier.from_config(name, path, config)
            log.info("serve: %s is a %s classifier, version %s, exploration %s", name, classifier.task, classifier.version,
                     config.exploration)
            classifiers.append(classifier)
    except BaseException:
        store.close()
        raise
    if not config.auth:
        log.warning("serve: AUTH IS OFF (--no-auth): anyone who can reach %s:%d acts as the admin user 'anonymous'. "
                    "Use this only for a local demo.", config.host, config.port)
    return create_app(config, store, models, classifiers, upstream)


def _route_models(specs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``--model`` specs split into chat models and classifier folders, which are served on
    /v1/classify as ``--classifier`` would serve them; anything else is refused here, before the
    store is opened or a weight is loaded."""
    from alignloop.models.load import model_family
    from alignloop.serve.engine import require_chat_model

    chat, classifiers = [], []
    for name, path in specs:
        family = model_family(path, f"model {name!r} at")[0]
        if family == "classifier":
            log.info("serve: %s (%s) is a classifier, not a chat model: serving it on /v1/classify, as --classifier does", name, path)
            classifiers.append((name, path))
            continue
        if family != "causal_lm":
            require_chat_model(name, path)  # refuses it, saying what the folder holds
        chat.append((name, path))
    return chat, classifiers


def serve_forever(config: ServeConfig) -> None:
    import uvicorn

    app = build_app(config)
    log.info("serve: http://%s:%d/ (API under /v1, docs at /docs)", config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=10)
