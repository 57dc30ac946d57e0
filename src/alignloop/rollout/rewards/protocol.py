"""What every reward source is and returns: the protocol, the text of a prompt or completion, and
the check that a batch of rewards is one finite number per row."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from alignloop.errors import AlignloopError

Message = dict[str, Any]
Prompt = str | list[Message]
Completion = str | list[Message]


class RewardError(AlignloopError):
    """A reward source failed on a batch: names the source, the row and what was wrong."""


@runtime_checkable
class RewardSource(Protocol):
    """Anything that scores a batch: one float per (prompt, completion) row, in row order."""

    name: str

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], **fields: Sequence[Any]
    ) -> list[float]: ...


def completion_text(completion: Completion) -> str:
    """The text of a completion: the string itself, or its messages' contents joined by newlines.

    >>> completion_text([{"role": "assistant", "content": "Hi."}, {"role": "assistant", "content": "Bye."}])
    'Hi.\\nBye.'
    """
    return _text(completion, "completion")


def prompt_text(prompt: Prompt) -> str:
    """The text of a prompt: the string itself, or every message's content (system turns included)
    joined by newlines."""
    return _text(prompt, "prompt")


def _text(value: Prompt | Completion, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(message["content"] for message in value)
    raise TypeError(f"a {what} must be a string or a list of messages, got {type(value).__name__}")


def check_rewards(values: Any, count: int, who: str) -> list[float]:
    """``values`` as ``count`` finite floats, or a RewardError naming ``who`` and the row.

    Takes a list or tuple of numbers (bools count as 1 and 0, so ``[c == a for ...]`` works), or a
    numpy array or torch tensor. ``None`` is refused, though TRL lets a function skip a row with
    it: a row without a reward has no advantage to learn from, and guessing 0 would bias it.
    """
    if hasattr(values, "tolist"):  # numpy arrays and torch tensors
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"{who} returned a {type(values).__name__}; expected a list of {count} numbers")
    if len(values) != count:
        raise RewardError(f"{who} returned {len(values)} values for {count} completions")
    rewards = []
    for row, value in enumerate(values):
        if value is None:
            raise RewardError(f"{who} returned None for row {row}; every row needs a number")
        if not isinstance(value, numbers.Real):
            shown = shorten(repr(value))
            raise RewardError(f"{who} returned {shown} ({type(value).__name__}) for row {row}; expected a number")
        reward = float(value)
        if not math.isfinite(reward):
            raise RewardError(f"{who} returned {reward} for row {row}; rewards must be finite")
        rewards.append(reward)
    return rewards


def check_batch(prompts: Sequence[Any], completions: Sequence[Any], fields: Mapping[str, Sequence[Any]]) -> None:
    """A ValueError unless the prompts and every field column have one value per completion."""
    # The loop builds these columns from one dataset: a mismatch is a bug there, not user input.
    for column, values in {"prompts": prompts, **fields}.items():
        if len(values) != len(completions):
            raise ValueError(f"reward batch misaligned: {len(values)} {column} for {len(completions)} completions")


def shorten(text: str, width: int = 40) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``width`` characters with "…"."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
