"""rollout/exploration.py: the policy a served classifier shows labels by, and the exact
propensity it returns with each choice."""

from __future__ import annotations

import pytest
import torch

from alignloop.errors import ConfigError
from alignloop.rollout.exploration import Exploration, choose, choose_each, parse_exploration

PROBS = torch.tensor([0.02, 0.95, 0.02, 0.01])


@pytest.mark.parametrize(("spec", "expected"), [
    ("greedy", Exploration("greedy", 0.0)),
    ("epsilon:0.1", Exploration("epsilon", 0.1)),
    ("epsilon:0", Exploration("epsilon", 0.0)),
    ("temperature:1.0", Exploration("temperature", 0.0, 1.0)),
    (" temperature:0.5 ", Exploration("temperature", 0.0, 0.5)),
])
def test_parse(spec: str, expected: Exploration) -> None:
    assert parse_exploration(spec) == expected


@pytest.mark.parametrize("spec", ["", "eps:0.1", "epsilon", "epsilon:1.5", "epsilon:-0.1", "epsilon:x", "temperature:0",
                                  "temperature:inf", "greedy:1", "softmax"])
def test_parse_refuses_and_names_the_option(spec: str) -> None:
    with pytest.raises(ConfigError, match="^exploration: "):
        parse_exploration(spec)


def test_answer_shape() -> None:
    assert parse_exploration("epsilon:0.1").to_json() == {"method": "epsilon", "epsilon": 0.1}
    assert parse_exploration("temperature:2").to_json() == {"method": "temperature", "temperature": 2.0}
    assert parse_exploration("greedy").to_json() == {"method": "greedy"}


@pytest.mark.parametrize("spec", ["greedy", "epsilon:0.1", "epsilon:1", "temperature:1.0", "temperature:0.3"])
def test_propensities_sum_to_one_over_the_choices(spec: str) -> None:
    exploration = parse_exploration(spec)
    for probs in (PROBS, torch.tensor([0.25, 0.25, 0.25, 0.25]), torch.tensor([0.0, 0.3, 0.7])):
        pi = exploration.policy(probs)
        assert float(pi.sum()) == pytest.approx(1.0, abs=1e-12)
        assert bool((pi >= 0).all())


def test_epsilon_greedy_propensities_are_exact() -> None:
    pi = parse_exploration("epsilon:0.1").policy(PROBS)
    assert pi.tolist() == [0.025, 0.9 + 0.025, 0.025, 0.025]  # every label keeps ε/K: weights ≤ K/ε
    index, propensity = choose(PROBS, parse_exploration("greedy"), torch.Generator().manual_seed(0))
    assert (index, propensity) == (1, 1.0)


def test_temperature_one_samples_from_the_model() -> None:
    pi = parse_exploration("temperature:1").policy(PROBS)
    assert torch.allclose(pi, PROBS.double(), atol=1e-7)
    sharp = parse_exploration("temperature:0.5").policy(PROBS)
    assert float(sharp[1]) > 0.95 and torch.allclose(sharp, PROBS.double() ** 2 / (PROBS.double() ** 2).sum())


@pytest.mark.parametrize("spec", ["epsilon:0.3", "temperature:1.0"])
def test_empirical_frequencies_match_the_propensities(spec: str) -> None:
    exploration, generator = parse_exploration(spec), torch.Generator().manual_seed(1234)
    n = 20_000
    counts = torch.zeros(4)
    returned: dict[int, float] = {}
    for _ in range(n):
        index, propensity = choose(PROBS, exploration, generator)
        counts[index] += 1
        returned.setdefault(index, propensity)
        assert returned[index] == propensity  # the same choice always reports the same propensity
    pi = exploration.policy(PROBS)
    for index, propensity in returned.items():
        assert propensity == float(pi[index])
        # 4 standard deviations of a binomial proportion
        assert abs(counts[index] / n - propensity) < 4 * (propensity * (1 - propensity) / n) ** 0.5 + 1e-9


def test_choices_are_seeded() -> None:
    exploration = parse_exploration("epsilon:0.5")
    draws = [[choose(PROBS, exploration, g)[0] for _ in range(50)] for g in
             (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))]
    assert draws[0] == draws[1]


def test_ner_chooses_each_word_independently() -> None:
    words = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    tags, propensities = choose_each(words, parse_exploration("greedy"), torch.Generator().manual_seed(0))
    assert tags == [0, 1, 2] and propensities == [1.0, 1.0, 1.0]
    tags, propensities = choose_each(words, parse_exploration("epsilon:0.3"), torch.Generator().manual_seed(3))
    pi = parse_exploration("epsilon:0.3")
    assert propensities == [float(pi.policy(row)[t]) for row, t in zip(words, tags)]
