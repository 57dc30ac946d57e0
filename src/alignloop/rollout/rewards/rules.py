"""Rules: reward sources that score each completion's text on its own, with no model or data."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from alignloop.errors import ConfigError
from alignloop.rollout.rewards.protocol import Completion, Prompt, completion_text


class TextRule:
    """A rule's batch call: ``score`` on each completion's text, in row order."""

    name: str

    def score(self, text: str) -> float:
        raise NotImplementedError

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], **fields: Sequence[Any]
    ) -> list[float]:
        return [self.score(completion_text(c)) for c in completions]


REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE, "a": re.ASCII}


class RegexRule(TextRule):
    """``match`` if the pattern occurs in the completion text, else ``miss``.

    ``search=True`` looks anywhere (``re.search``); ``search=False`` needs the whole text to match
    (``re.fullmatch``). ``flags`` are letters: i (ignore case), m (``^``/``$`` at every line),
    s (``.`` matches newlines), x (verbose), a (ASCII classes).

    >>> rule = RegexRule(r"^Answer: \\d+$", flags="m")
    >>> rule(["2+2?", "2+2?"], ["Two and two.\\nAnswer: 4", "Answer: four"])
    [1.0, 0.0]
    """

    def __init__(
        self,
        pattern: str,
        match: float = 1.0,
        miss: float = 0.0,
        flags: str = "",
        search: bool = True,
        name: str = "rule:regex",
    ) -> None:
        unknown = sorted(set(flags) - REGEX_FLAGS.keys())
        if unknown:
            letters = "".join(REGEX_FLAGS)
            raise ConfigError(f"regex flags '{flags}': unknown flag '{unknown[0]}'; use letters from {letters}")
        bits = 0
        for letter in flags:
            bits |= REGEX_FLAGS[letter]
        try:
            self.regex = re.compile(pattern, bits)
        except re.error as error:
            raise ConfigError(f"regex pattern '{pattern}' is not valid: {error}") from None
        self.find = self.regex.search if search else self.regex.fullmatch
        self.match, self.miss = float(match), float(miss)
        self.name = name

    def score(self, text: str) -> float:
        return self.match if self.find(text) else self.miss


LENGTH_UNITS: dict[str, Callable[[str], int]] = {"words": lambda text: len(text.split()), "chars": len}


class LengthRule(TextRule):
    """1.0 when the completion's length n is inside [min, max], falling linearly to 0 outside::

        r = 1                              if min ≤ n ≤ max
        r = max(0, 1 − (n − max) / scale)  if n > max
        r = max(0, 1 − (min − n) / scale)  if n < min

    n counts ``words`` (whitespace-separated) or ``chars``. Either bound may be None (no bound).
    ``scale`` defaults to the bound crossed, so the penalty is the relative distance: with max 50
    words, 75 words score 0.5 and 100 or more score 0.

    >>> rule = LengthRule(max=4)
    >>> rule(["q"] * 3, ["one two three", "one two three four five six", "a b c d e f g h"])
    [1.0, 0.5, 0.0]
    """

    def __init__(
        self,
        min: int | None = None,
        max: int | None = None,
        unit: str = "words",
        scale: float | None = None,
        name: str = "rule:length",
    ) -> None:
        if min is None and max is None:
            raise ConfigError("length rule needs min, max or both")
        if (min is not None and min < 0) or (max is not None and max < 0):
            raise ConfigError(f"length rule bounds must be ≥ 0 (got min {min}, max {max})")
        if min is not None and max is not None and min > max:
            raise ConfigError(f"length rule min {min} is above max {max}")
        if unit not in LENGTH_UNITS:
            raise ConfigError(f"length rule unit '{unit}' is not one of {', '.join(LENGTH_UNITS)}")
        if scale is not None and scale <= 0:
            raise ConfigError(f"length rule scale must be > 0 (got {scale})")
        self.min, self.max, self.unit, self.scale = min, max, unit, scale
        self.name = name

    def score(self, text: str) -> float:
        n = LENGTH_UNITS[self.unit](text)
        if self.max is not None and n > self.max:
            distance, bound = n - self.max, self.max
        elif self.min is not None and n < self.min:
            distance, bound = self.min - n, self.min
        else:
            return 1.0
        # A crossed bound of 0 can only be max 0; any length over it is then a full miss.
        scale = self.scale if self.scale is not None else bound or 1
        return max(0.0, 1.0 - distance / scale)


KEYWORD_MODES = ("any", "all", "count")


class KeywordRule(TextRule):
    """Rewards keywords that occur as whole words in the completion (case-insensitive by default)::

        any:   r = reward if at least one keyword occurs, else 0
        all:   r = reward if every keyword occurs, else 0
        count: r = reward × (keywords that occur) / (number of keywords)

    ``forbidden=True`` penalises instead: r becomes −r. A keyword is whole where no letter, digit
    or underscore touches it: "cat" occurs in "the cat." but not in "catalog".

    >>> rule = KeywordRule(["paris", "france"], mode="count")
    >>> rule(["q"] * 3, ["Paris is in France.", "Paris, Texas", "Parisian food"])
    [1.0, 0.5, 0.0]
    """

    def __init__(
        self,
        words: Sequence[str],
        mode: str = "any",
        case_sensitive: bool = False,
        reward: float = 1.0,
        forbidden: bool = False,
        name: str = "rule:keywords",
    ) -> None:
        if isinstance(words, str) or not words or not all(isinstance(w, str) and w for w in words):
            raise ConfigError(f"keywords rule needs a non-empty list of non-empty words (got {words!r})")
        if mode not in KEYWORD_MODES:
            raise ConfigError(f"keywords rule mode '{mode}' is not one of {', '.join(KEYWORD_MODES)}")
        flags = 0 if case_sensitive else re.IGNORECASE
        self.patterns = [re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", flags) for word in words]
        self.words, self.mode, self.reward, self.forbidden = list(words), mode, float(reward), forbidden
        self.name = name

    def score(self, text: str) -> float:
        found = sum(1 for pattern in self.patterns if pattern.search(text))
        if self.mode == "any":
            score = self.reward if found else 0.0
        elif self.mode == "all":
            score = self.reward if found == len(self.patterns) else 0.0
        else:
            score = self.reward * found / len(self.patterns)
        # `score and`: negating 0.0 gives -0.0, which would log as a penalty.
        return -score if self.forbidden and score else score


def _is_json(text: str, value: Any) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


FORMAT_CHECKS: dict[str, Callable[[str, Any], bool]] = {
    "json": _is_json,
    "starts_with": lambda text, value: text.startswith(value),
    "ends_with": lambda text, value: text.endswith(value),
    "max_lines": lambda text, value: len(text.splitlines()) <= value,
}


class FormatRule(TextRule):
    """1.0 when the completion text, stripped of surrounding whitespace, has the format, else 0.0::

        json:        it parses as JSON (no value)
        starts_with: it starts with ``value`` (a string)
        ends_with:   it ends with ``value`` (a string)
        max_lines:   it has at most ``value`` lines (an integer ≥ 1; 1 means one line)

    >>> rule = FormatRule("starts_with", "Answer:")
    >>> rule(["q"] * 2, ["  Answer: 4", "4"])
    [1.0, 0.0]
    """

    def __init__(self, kind: str, value: str | int | None = None, name: str = "rule:format") -> None:
        if kind not in FORMAT_CHECKS:
            raise ConfigError(f"format rule kind '{kind}' is not one of {', '.join(FORMAT_CHECKS)}")
        if kind == "json" and value is not None:
            raise ConfigError(f"format rule json takes no value (got {value!r})")
        if kind in ("starts_with", "ends_with") and not (isinstance(value, str) and value):
            raise ConfigError(f"format rule {kind} needs a non-empty string value (got {value!r}; quote it in YAML)")
        if kind == "max_lines" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"format rule max_lines needs an integer value ≥ 1 (got {value!r})")
        self.kind, self.value = kind, value
        self.name = name

    def score(self, text: str) -> float:
        return 1.0 if FORMAT_CHECKS[self.kind](text.strip(), self.value) else 0.0
