"""Simulated users: the hidden utilities rank answers as their taste says, corrections move an
answer toward the taste, Bradley–Terry noise and trolls vote as specified, and a population
drives a real server through its HTTP API, leaving feedback that encodes the hidden preference
without ever sending it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alignloop.config import ServeConfig
from alignloop.envs.preferences import (
    LengthPreference,
    MixturePreference,
    SentimentPreference,
    TopicPreference,
    bradley_terry,
    mean_utility,
    preference_named,
)
from alignloop.envs.users import SimulatedUser, make_population, run_session
from alignloop.errors import ConfigError
from alignloop.feedback.store import FeedbackStore, upgrade
from alignloop.serve.app import create_app
from alignloop.serve.engine import ServedModel

NEUTRAL = "We went to the shop and came back home."


def test_each_preference_ranks_answers_by_its_taste() -> None:
    sentiment = SentimentPreference()
    assert sentiment.utility("", "I love it, what a wonderful day!") > sentiment.utility("", NEUTRAL) > sentiment.utility("", "This is awful and I hate it.")
    assert sentiment.utility("", NEUTRAL) == pytest.approx(0.5)

    length = LengthPreference(low=5, high=10, softness=5)
    assert length.utility("", "one two three four five six") == 1.0
    assert length.utility("", "") == pytest.approx(0.5)  # 5 words short: half
    assert length.utility("", " ".join(["w"] * 20)) == pytest.approx(0.25)  # 10 words over: a quarter

    topic = TopicPreference(topic_words=("music", "guitar", "band"), enough=2)
    assert [topic.utility("", t) for t in (NEUTRAL, "I like music.", "Music, a guitar!")] == [0.0, 0.5, 1.0]

    mixture = MixturePreference(groups=((3.0, length), (1.0, topic)))
    text = "I like music a lot today"
    assert mixture.utility("", text) == pytest.approx((3 * length.utility("", text) + topic.utility("", text)) / 4)
    assert {preference_named(n).name for n in ("sentiment", "length", "topic", "mixture")} == {"sentiment", "length", "topic", "mixture"}
    with pytest.raises(ConfigError, match="choose one of"):
        preference_named("vibes")


@pytest.mark.parametrize("preference", [SentimentPreference(), LengthPreference(), TopicPreference(), MixturePreference()])
@pytest.mark.parametrize("answer", [NEUTRAL, "no", " ".join(["blah"] * 40), "I hate this."])
def test_a_correction_is_at_least_as_good_for_its_author(preference, answer: str) -> None:
    assert preference.utility("", preference.improve("", answer)) >= preference.utility("", answer)


def test_bradley_terry_noise() -> None:
    assert bradley_terry(0.7, 0.3, 0) == 1.0 and bradley_terry(0.3, 0.7, 0) == 0.0 and bradley_terry(0.5, 0.5, 0) == 0.5
    assert bradley_terry(0.7, 0.3, 0.1) == pytest.approx(1 - bradley_terry(0.3, 0.7, 0.1))
    assert 0.5 < bradley_terry(0.7, 0.3, 10.0) < 0.52  # a hot user votes nearly at random


def test_honest_users_and_trolls_vote_as_specified() -> None:
    rng = random.Random(0)
    pref = SentimentPreference()
    good, bad = "I love it, wonderful!", "I hate it, awful."

    def share_for_good(user: SimulatedUser) -> float:
        return sum(user.prefers_a("", good, bad, rng) for _ in range(2000)) / 2000

    assert share_for_good(SimulatedUser("h", "k", pref, temperature=0.05)) > 0.99
    assert 0.45 < share_for_good(SimulatedUser("r", "k", pref, troll="random")) < 0.55
    assert share_for_good(SimulatedUser("c", "k", pref, temperature=0.05, troll="contrary")) < 0.01
    honest = SimulatedUser("h", "k", pref, temperature=0.05)
    assert honest.rating("", good, rng) >= 4 and honest.rating("", bad, rng) <= 2
    assert honest.thumbs_up("", good, rng) and not honest.thumbs_up("", bad, rng)
    assert pref.utility("", honest.correction("", bad)) > pref.utility("", bad)


def test_population_mixes_groups_and_trolls() -> None:
    mixture = MixturePreference()
    users = make_population(mixture, 40, add_user=lambda name: f"key-{name}", troll_share=0.25, seed=1)
    assert sum(u.troll is not None for u in users) == 10
    assert {type(u.preference).__name__ for u in users} == {"SentimentPreference", "LengthPreference", "TopicPreference"}
    assert len({u.name for u in users}) == 40 and all(u.key == f"key-{u.name}" for u in users)
    with pytest.raises(ConfigError):
        make_population(mixture, 0, add_user=str)


def test_users_drive_the_server_over_http(tmp_path: Path, tiny_model_dir: Path) -> None:
    url = f"sqlite:///{tmp_path}/feedback.db"
    upgrade(url)
    store = FeedbackStore(url)
    app = create_app(ServeConfig(rate_limit_per_minute=0), store, [ServedModel("tiny", str(tiny_model_dir))])
    preference = LengthPreference(low=3, high=6, softness=2)
    users = make_population(preference, 4, add_user=store.add_user, temperature=0.0, seed=0)  # noiseless: every vote follows the taste
    prompts = ["Hi!", "What do you like to eat?", "Tell me about your day.", "Any pets?"]
    with TestClient(app) as client:
        stats = run_session(client, users, prompts, "tiny", turns_per_user=10, seed=0, max_tokens=12)  # users at once
        again = run_session(client, users, prompts, "tiny", turns_per_user=10, seed=0, max_tokens=12, concurrent=False)
    # Each user's own seeded stream: one at a time or all at once, they ask and vote the same.
    assert (again.feedback, sorted(again.utilities)) == (stats.feedback, sorted(stats.utilities))
    assert sum(stats.feedback.values()) == 40 and stats.completions == 40 + stats.feedback["pairwise"]
    assert set(stats.feedback) == {"pairwise", "thumbs", "rating", "correction"}

    reader = FeedbackStore(url)
    for user in users:  # every vote is in the store, under the user who gave it
        key_user = reader.user_by_key(user.key)
        assert len(reader.list_feedback(key_user.id)) == 20
    # The exported pairs carry the hidden taste: the chosen answer is the one the users' utility
    # ranks higher (or equal), though no utility ever crossed the API.
    pairs, _ = reader.export("pairs")
    compared = [p for p in pairs if p["source"] == "pairwise"]
    assert compared
    text = lambda messages: messages[0]["content"]  # noqa: E731
    for p in compared:
        u_chosen, u_rejected = (preference.utility("", text(p[k])) for k in ("chosen", "rejected"))
        assert u_chosen >= u_rejected - 1e-9, json.dumps(p)[:300]
    assert mean_utility(preference, ["x"], ["one two three four"]) == 1.0
