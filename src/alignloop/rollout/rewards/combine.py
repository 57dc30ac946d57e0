"""Weighted sums of reward sources, each normalised over the batch first."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from alignloop.errors import ConfigError
from alignloop.rollout.rewards.protocol import Completion, Prompt, RewardSource, check_rewards


def zscore(values: list[float]) -> list[float]:
    """(x − mean) / (std + 1e-8) over the batch, std with ddof 0; a batch of one gives [0.0]."""
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / len(values))
    return [(x - mean) / (std + 1e-8) for x in values]


def minmax(values: list[float]) -> list[float]:
    """(x − min) / (max − min) over the batch, in [0, 1]; a constant batch (or one row) gives 0.5."""
    low, high = min(values), max(values)
    if high == low:
        return [0.5] * len(values)  # no ranking to express: the middle, not either end
    return [(x - low) / (high - low) for x in values]


NORMALIZERS: dict[str, Callable[[list[float]], list[float]]] = {"none": list, "zscore": zscore, "minmax": minmax}


class WeightedSum:
    """Named sources, each normalised across the batch, then weighted and added::

        r = Σ_i w_i · normalize_i(r_i)

        none:   x
        zscore: (x − mean) / (std + 1e-8)    a batch of one, or a constant batch, gives 0
        minmax: (x − min) / (max − min)      a constant batch, or a batch of one, gives 0.5

    Mean, std, min and max are over the whole batch passed in (every prompt's completions
    together), so sources on different scales weigh what their weights say. ``last_parts`` holds
    each source's raw rewards from the last call, by name, for logging.

    >>> from alignloop.rollout.rewards import LengthRule
    >>> short, long = LengthRule(max=2, name="short"), LengthRule(min=4, name="long")
    >>> both = WeightedSum([(short, 1.0, "none"), (long, 2.0, "minmax")])
    >>> both(["q"] * 2, ["yes", "well, maybe yes"])
    [1.0, 2.5]
    >>> both.last_parts
    {'short': [1.0, 0.5], 'long': [0.25, 0.75]}
    """

    def __init__(self, parts: Sequence[tuple[RewardSource, float, str]], name: str = "sum") -> None:
        if not parts:
            raise ConfigError("weighted sum needs at least one source")
        names = [source.name for source, _, _ in parts]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"weighted sum has two sources named '{repeated[0]}'; each needs its own name")
        for source, weight, normalize in parts:
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ConfigError(f"weighted sum: weight of '{source.name}' must be a finite number (got {weight!r})")
            if normalize not in NORMALIZERS:
                choices = ", ".join(NORMALIZERS)
                raise ConfigError(
                    f"weighted sum: normalize of '{source.name}' is {normalize!r}; expected one of {choices}"
                )
        self.parts = [(source, float(weight), normalize) for source, weight, normalize in parts]
        self.name = name
        self.last_parts: dict[str, list[float]] = {}

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], **fields: Sequence[Any]
    ) -> list[float]:
        total = [0.0] * len(completions)
        self.last_parts = {}
        for source, weight, normalize in self.parts:
            raw = check_rewards(source(prompts, completions, **fields), len(completions), f"reward '{source.name}'")
            self.last_parts[source.name] = raw
            for row, value in enumerate(NORMALIZERS[normalize](raw)):
                total[row] += weight * value
        return total

