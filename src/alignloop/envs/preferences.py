"""Hidden preferences: what a simulated user wants from an answer, as a utility in [0, 1].

A user never hands its utility to the trainer; it only shows through the feedback it gives (see
:mod:`alignloop.envs.users`). The same utilities, averaged over held-out prompts, are the ground
truth a report uses to say whether a model got better *for these users*.

Each preference also knows how to :meth:`~Preference.improve` an answer toward its taste, which
is how a simulated user writes a correction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from alignloop.errors import ConfigError

_WORD = re.compile(r"[A-Za-z']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


class Preference(Protocol):
    name: str

    def utility(self, prompt: str, answer: str) -> float:
        """How much the user likes ``answer`` to ``prompt``: 0 (not at all) to 1."""

    def improve(self, prompt: str, answer: str) -> str:
        """The answer rewritten toward this taste (a correction)."""


@lru_cache(maxsize=1)
def _vader():  # SentimentIntensityAnalyzer; loading its lexicon takes ~0.1 s, once
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ConfigError("the sentiment preference needs the `vaderSentiment` package (pip install vaderSentiment)") from None
    return SentimentIntensityAnalyzer()


@dataclass(frozen=True)
class SentimentPreference:
    """Likes positive answers: utility = (VADER compound + 1) / 2, so a neutral answer is 0.5."""

    name: str = "sentiment"
    cheer: str = "That sounds wonderful, I love it!"

    def utility(self, prompt: str, answer: str) -> float:
        return (_vader().polarity_scores(answer)["compound"] + 1) / 2

    def improve(self, prompt: str, answer: str) -> str:
        return f"{answer.strip()} {self.cheer}".strip()


@dataclass(frozen=True)
class LengthPreference:
    """Likes answers of ``low``–``high`` words: 1 inside the band, falling off by half every
    ``softness`` words outside it."""

    low: int = 8
    high: int = 20
    softness: float = 6.0
    name: str = "length"

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ConfigError(f"length preference: need 0 ≤ low ≤ high (got {self.low}, {self.high})")

    def utility(self, prompt: str, answer: str) -> float:
        n = len(words(answer))
        gap = self.low - n if n < self.low else max(0, n - self.high)
        return 0.5 ** (gap / self.softness)

    def improve(self, prompt: str, answer: str) -> str:
        tokens = answer.split()
        target = (self.low + self.high) // 2
        if len(words(answer)) > self.high:
            return " ".join(tokens[:target])
        filler = "I really enjoy talking about this with you".split()
        while len(tokens) < self.low:
            tokens += filler[: self.low - len(tokens)]
        return " ".join(tokens)


@dataclass(frozen=True)
class TopicPreference:
    """Likes answers that mention its topic words: utility = share of the first ``enough``
    distinct topic words present (case-insensitive), so one mention already counts."""

    topic_words: tuple[str, ...] = ("music", "song", "guitar", "concert", "band")
    enough: int = 2
    name: str = "topic"

    def utility(self, prompt: str, answer: str) -> float:
        present = {w.lower() for w in words(answer)} & {w.lower() for w in self.topic_words}
        return min(len(present), self.enough) / self.enough

    def improve(self, prompt: str, answer: str) -> str:
        a, b = self.topic_words[0], self.topic_words[1 % len(self.topic_words)]
        return f"{answer.strip()} It reminds me of {a} and a {b} I like.".strip()


@dataclass(frozen=True)
class MixturePreference:
    """A population of groups with different tastes: the utility of an answer to the population
    is the weight-averaged utility of its groups. Each simulated user belongs to one group."""

    groups: tuple[tuple[float, Preference], ...] = field(default_factory=lambda: (
        (0.5, SentimentPreference()), (0.3, LengthPreference()), (0.2, TopicPreference())))
    name: str = "mixture"

    def __post_init__(self) -> None:
        if not self.groups or any(w <= 0 for w, _ in self.groups):
            raise ConfigError("mixture preference: give one or more groups, each with a weight > 0")

    def utility(self, prompt: str, answer: str) -> float:
        total = sum(w for w, _ in self.groups)
        return sum(w * p.utility(prompt, answer) for w, p in self.groups) / total

    def improve(self, prompt: str, answer: str) -> str:
        """The best for the population among each group's rewrite and all of them in turn; the
        answer itself when none is better."""
        candidates = [answer] + [p.improve(prompt, answer) for _, p in self.groups]
        combined = answer
        for _, p in self.groups:
            combined = p.improve(prompt, combined)
        return max(candidates + [combined], key=lambda text: self.utility(prompt, text))


def preference_named(name: str) -> Preference:
    """The built-in hidden preferences of ``alignloop demo --preference``."""
    known = {"sentiment": SentimentPreference, "length": LengthPreference, "topic": TopicPreference,
             "mixture": MixturePreference}
    if name not in known:
        raise ConfigError(f"preference {name!r}: choose one of {', '.join(known)}")
    return known[name]()


def mean_utility(preference: Preference, prompts: Sequence[str], answers: Sequence[str]) -> float:
    """The population's ground truth on held-out prompts: the mean utility of the answers."""
    if len(prompts) != len(answers) or not answers:
        raise ValueError(f"{len(prompts)} prompts and {len(answers)} answers")
    return sum(preference.utility(p, a) for p, a in zip(prompts, answers)) / len(answers)


def bradley_terry(utility_a: float, utility_b: float, temperature: float) -> float:
    """P(a is preferred to b) = σ((u_a − u_b) / T): T → 0 always picks the better answer, a
    large T votes nearly at random."""
    if temperature <= 0:
        return 1.0 if utility_a > utility_b else 0.0 if utility_a < utility_b else 0.5
    return 1 / (1 + math.exp(-(utility_a - utility_b) / temperature))


# --- the hidden utilities as reward functions (`module:fn`), for the gate's judge and reports ---
def _utility_reward(name: str):
    def reward(prompts: Sequence, completions: Sequence[str], **_: object) -> list[float]:
        from alignloop.rollout.rewards import prompt_text

        preference = preference_named(name)
        return [preference.utility(prompt_text(p), c) for p, c in zip(prompts, completions)]

    reward.__name__ = reward.__qualname__ = f"{name}_utility"
    reward.__doc__ = f"The {name} population's mean utility of each completion: the simulation's ground truth."
    return reward


sentiment_utility = _utility_reward("sentiment")
length_utility = _utility_reward("length")
topic_utility = _utility_reward("topic")
mixture_utility = _utility_reward("mixture")
