"""How a served classifier picks what it shows, and with what probability.

Feedback on a classifier's answer is a bandit signal: the user judges the label that was shown,
not the others. Learning from it off-policy (inverse propensity weighting, :mod:`alignloop.losses`)
needs two things from serving: every label must sometimes be shown, and the exact probability
with which the shown one was picked (its *propensity*) must be stored with it. The policies:

| spec              | π(a | x), with p = the model's probabilities over K labels | propensity of the best label |
| ----------------- | -------------------------------------------------------- | ---------------------------- |
| ``greedy``        | 1 for argmax p, else 0                                   | 1                            |
| ``epsilon:ε``     | (1 − ε)·[a = argmax p] + ε/K                              | 1 − ε + ε/K                  |
| ``temperature:T`` | p_a^(1/T) / Σ_b p_b^(1/T)   (T = 1: sample from p itself)   | depends on p                 |

``epsilon:0.1`` is the serving default: the best guess is shown 90% of the time (plus its share
of the 10%), so users mostly see the model at its best, while every label keeps at least ε/K, so
an importance weight 1/π is at most K/ε (40 for 4 labels): off-policy estimates stay bounded.
Greedy logs nothing but the model's own choices (no weight for any other label can be formed);
temperature sampling can give a label a vanishing probability, hence an unbounded weight.

For NER each word's tag is chosen independently with the same policy (:func:`choose_each`): a
sequence's propensity is the product of its words', and so is an entity's over its words.
Everything here is pure: the randomness comes from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignloop.errors import ConfigError

METHODS = ("greedy", "epsilon", "temperature")
DEFAULT_EXPLORATION = "epsilon:0.1"


@dataclass(frozen=True)
class Exploration:
    """An exploration policy: ``method`` and its parameter (``epsilon`` or ``temperature``)."""

    method: str = "epsilon"
    epsilon: float = 0.1
    temperature: float = 1.0

    def to_json(self) -> dict:
        """What the API answers and the store keeps: ``{"method": "epsilon", "epsilon": 0.1}``."""
        if self.method == "epsilon":
            return {"method": "epsilon", "epsilon": self.epsilon}
        if self.method == "temperature":
            return {"method": "temperature", "temperature": self.temperature}
        return {"method": "greedy"}

    def policy(self, probs: torch.Tensor) -> torch.Tensor:
        """π over the K choices (float64, sums to 1) given the model's probabilities ``probs`` [K]."""
        p = probs.detach().to("cpu", torch.float64)
        k = p.numel()
        if self.method == "temperature":
            logits = torch.log(p) / self.temperature  # p = 0 stays impossible: log 0 = -inf
            return torch.softmax(logits, dim=0)
        best = int(torch.argmax(p))  # ties: the first, as everywhere else argmax is read
        eps = self.epsilon if self.method == "epsilon" else 0.0
        pi = torch.full((k,), eps / k, dtype=torch.float64)
        pi[best] += 1.0 - eps
        return pi


def parse_exploration(spec: str | Exploration) -> Exploration:
    """``"greedy"``, ``"epsilon:0.1"`` or ``"temperature:1.0"`` → :class:`Exploration`; a
    ConfigError naming ``exploration`` for anything else."""
    if isinstance(spec, Exploration):
        return spec
    text = str(spec).strip()
    method, sep, value = text.partition(":")
    usage = "use greedy, epsilon:E (0 ≤ E ≤ 1; default epsilon:0.1) or temperature:T (T > 0)"
    if method == "greedy" and not sep:
        return Exploration("greedy", 0.0)
    if method not in ("epsilon", "temperature") or not sep:
        raise ConfigError(f"exploration: {text!r} is not an exploration policy; {usage}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"exploration: {value!r} in {text!r} is not a number; {usage}") from None
    if method == "epsilon":
        if not 0.0 <= number <= 1.0:
            raise ConfigError(f"exploration: epsilon must be in [0, 1], got {number}; {usage}")
        return Exploration("epsilon", number)
    if not (number > 0.0 and number != float("inf")):
        raise ConfigError(f"exploration: temperature must be > 0 and finite, got {number}; {usage}")
    return Exploration("temperature", 0.0, number)


def choose(probs: torch.Tensor, exploration: Exploration, generator: torch.Generator) -> tuple[int, float]:
    """Pick one of K choices by ``exploration`` given the model's ``probs`` [K]; return its index
    and its probability under the policy (the propensity to store with it)."""
    pi = exploration.policy(probs)
    if exploration.method == "greedy":
        index = int(torch.argmax(pi))
    else:
        index = int(torch.multinomial(pi, 1, generator=generator))
    return index, float(pi[index])


def choose_each(probs: torch.Tensor, exploration: Exploration, generator: torch.Generator) -> tuple[list[int], list[float]]:
    """:func:`choose` for each row of ``probs`` [N, K] independently (NER: one row per word)."""
    picks = [choose(row, exploration, generator) for row in probs]
    return [i for i, _ in picks], [p for _, p in picks]
