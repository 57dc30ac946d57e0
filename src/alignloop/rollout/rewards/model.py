"""A trained reward model as a reward source."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from alignloop.rollout.rewards.protocol import Completion, Prompt, check_batch, check_rewards


class Scorer(Protocol):
    """What :class:`ModelReward` needs from a loaded reward model."""

    def score(self, prompts: list[Prompt], completions: list[Completion]) -> list[float]: ...


def load_scorer(path: str, batch_size: int, max_length: int | None) -> Scorer:
    """The reward model saved at ``path`` (by ``alignloop reward``), ready to score."""
    # Imported here: torch models load only when a model reward is first called, not when a
    # config is checked.
    from alignloop.models.reward import RewardScorer

    return RewardScorer(path, batch_size=batch_size, max_length=max_length)


class ModelReward:
    """A trained reward model's scalar score for each (prompt, completion) row.

    The model loads at the first call (:func:`load_scorer`), so building a config stays cheap;
    pass ``scorer`` to use one already loaded. Rows are scored ``batch_size`` at a time,
    truncated to ``max_length`` tokens (default: the length the model was trained with).
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        max_length: int | None = None,
        name: str | None = None,
        scorer: Scorer | None = None,
    ) -> None:
        self.path = str(path)
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = name or f"model:{self.path}"
        self.scorer = scorer

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], **fields: Sequence[Any]
    ) -> list[float]:
        check_batch(prompts, completions, fields)
        if self.scorer is None:
            self.scorer = load_scorer(self.path, self.batch_size, self.max_length)
        scores = self.scorer.score(list(prompts), list(completions))
        return check_rewards(scores, len(completions), f"reward model {self.path}")

