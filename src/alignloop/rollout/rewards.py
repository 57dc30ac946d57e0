"""Reward sources: what every optimiser calls to score a batch of completions.

A reward source is a callable ``(prompts, completions, **fields) -> list[float]`` with a ``name``
(TRL's reward-function convention): one float per row, in row order. A prompt or a completion is a
string or a list of chat messages (``{"role": ..., "content": ...}``); ``fields`` are the prompt
dataset's other columns (``answer``, ...), one value per row.

| source                  | YAML                              | computes                                        |
| ----------------------- | --------------------------------- | ----------------------------------------------- |
| :class:`ModelReward`    | ``model: runs/rm/final``          | a trained reward model's score                  |
| :class:`FunctionReward` | ``function: my_rewards.py:score`` | a Python function's numbers                     |
| :class:`RegexRule`      | ``rule: regex``                   | ``match`` if the pattern occurs, else ``miss``  |
| :class:`LengthRule`     | ``rule: length``                  | 1 inside [min, max], falling linearly to 0      |
| :class:`KeywordRule`    | ``rule: keywords``                | ``reward`` for any / all / the share of keywords |
| :class:`FormatRule`     | ``rule: format``                  | 1 if JSON / starts with / ends with / ≤ N lines |
| :class:`WeightedSum`    | ``sum: {name: source, ...}``      | Σ_i w_i · normalize_i(r_i)                      |

A reward file (:func:`load_reward_file`) holds one spec; :func:`build_reward` builds it::

    sum:
      helpful: {model: runs/rm/final, weight: 1.0, normalize: zscore}
      short:   {rule: length, max: 50, unit: words, weight: 0.5}
      exact:   {function: my_rewards.py:exact_match, weight: 2.0}

Relative paths (model folders, function files) start at the current folder. What a model or a
function returns is checked by :func:`check_rewards`: one finite number per row, or a
:class:`RewardError` naming the source and the row (rows are numbered from 0, as in the batch).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from alignloop.config import read_yaml
from alignloop.errors import AlignloopError, ConfigError

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


class Scorer(Protocol):
    """What :class:`ModelReward` needs from a loaded reward model."""

    def score(self, prompts: list[Prompt], completions: list[Completion]) -> list[float]: ...


# ---------------------------------------------------------------------------------------------
# Text and checks
# ---------------------------------------------------------------------------------------------
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
            shown = _shorten(repr(value))
            raise RewardError(f"{who} returned {shown} ({type(value).__name__}) for row {row}; expected a number")
        reward = float(value)
        if not math.isfinite(reward):
            raise RewardError(f"{who} returned {reward} for row {row}; rewards must be finite")
        rewards.append(reward)
    return rewards


def _check_batch(prompts: Sequence[Any], completions: Sequence[Any], fields: Mapping[str, Sequence[Any]]) -> None:
    # The loop builds these columns from one dataset: a mismatch is a bug there, not user input.
    for column, values in {"prompts": prompts, **fields}.items():
        if len(values) != len(completions):
            raise ValueError(f"reward batch misaligned: {len(values)} {column} for {len(completions)} completions")


def _shorten(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _preview(prompt: Prompt) -> str:
    # The last message, not the whole chat: a shared system prompt would make every row look alike.
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"] if prompt else ""
    return f"'{_shorten(text)}'"


# ---------------------------------------------------------------------------------------------
# Python functions
# ---------------------------------------------------------------------------------------------
class FunctionReward:
    """A plain Python function as a reward, named ``module:function`` or ``path/to/file.py:function``.

    The function is called TRL's way, ``fn(prompts=..., completions=..., **fields)``, and returns
    one number per completion. A function with ``**kwargs`` gets every field; any other gets only
    the fields it names, so ``def exact(completions, answer)`` works. Files are loaded by path
    (relative to the current folder); modules are imported from ``sys.path``. Bad specs raise
    ConfigError here; a call that raises is re-run row by row to name the first failing row.
    """

    def __init__(self, spec: str, name: str | None = None) -> None:
        self.spec = spec
        self.name = name or f"function:{spec}"
        self.fn = load_function(spec)
        self._who = f"reward function {spec}"
        self._accepted, self._required = _keyword_parameters(self.fn)

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], **fields: Sequence[Any]
    ) -> list[float]:
        _check_batch(prompts, completions, fields)
        kwargs = self._kwargs(prompts, completions, fields)
        try:
            values = self.fn(**kwargs)
        except Exception as error:
            raise self._row_error(prompts, completions, fields, error) from error
        return check_rewards(values, len(completions), self._who)

    def _kwargs(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], fields: Mapping[str, Sequence[Any]]
    ) -> dict[str, Any]:
        offered = {"prompts": prompts, "completions": completions, **fields}
        missing = sorted(self._required - offered.keys())
        if missing:
            raise RewardError(
                f"{self._who} needs field '{missing[0]}', which the batch lacks (it has {', '.join(offered)}); "
                "add the column to the prompt dataset"
            )
        if self._accepted is None:
            return offered
        return {key: value for key, value in offered.items() if key in self._accepted}

    def _row_error(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Completion],
        fields: Mapping[str, Sequence[Any]],
        error: Exception,
    ) -> RewardError:
        """Re-call the function on one row at a time and name the first row that fails alone."""
        for row in range(len(completions)):
            one_row = {column: [values[row]] for column, values in fields.items()}
            try:
                self.fn(**self._kwargs([prompts[row]], [completions[row]], one_row))
            except Exception as row_error:  # noqa: BLE001 -- whatever it raises is what the user must see
                return RewardError(
                    f"{self._who} raised {type(row_error).__name__} on row {row} "
                    f"(prompt {_preview(prompts[row])}): {row_error}"
                )
        return RewardError(
            f"{self._who} raised {type(error).__name__} on a batch of {len(completions)} rows, "
            f"though each row alone scores: {error}"
        )


def load_function(spec: str) -> Callable[..., Any]:
    """The callable named by ``module:function`` or ``path/to/file.py:function`` (a dotted
    ``Class.method`` works too), or a ConfigError naming ``spec``."""
    # The last colon splits, so a Windows path (C:\\rewards.py:score) keeps its drive.
    target, colon, attribute = spec.rpartition(":")
    if not colon or not target or not attribute:
        raise ConfigError(f"reward function '{spec}': expected 'module:function' or 'path/to/file.py:function'")
    if not all(part.isidentifier() for part in attribute.split(".")):
        raise ConfigError(f"reward function '{spec}': '{attribute}' is not a function name")
    is_path = target.endswith(".py") or "/" in target or "\\" in target
    found: Any = _load_file(spec, target) if is_path else _import_module(spec, target)
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ConfigError(f"reward function '{spec}': {target} has no attribute '{part}'")
        found = getattr(found, part)
    if not callable(found):
        kind = type(found).__name__
        raise ConfigError(f"reward function '{spec}': {attribute} is not callable (it is a {kind} value)")
    return found


def _load_file(spec: str, target: str) -> ModuleType:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"reward function '{spec}': file {target} not found (relative paths start at {Path.cwd()})")
    # One name per file: two rewards.py in different folders must not replace each other.
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_alignloop_reward_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"reward function '{spec}': {target} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running, as `import` does: dataclasses and pickle look a module up by name.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ConfigError(
            f"reward function '{spec}': running {target} raised {type(error).__name__}: {error}"
        ) from error
    return module


def _import_module(spec: str, target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except Exception as error:
        # The module itself missing, not a module it imports: then the spec is what to fix.
        missing = error.name if isinstance(error, ModuleNotFoundError) else None
        if missing is not None and (target == missing or target.startswith(missing + ".")):
            raise ConfigError(
                f"reward function '{spec}': module '{target}' not found on sys.path "
                f"(for a file in this folder write {target.replace('.', '/')}.py:{spec.rpartition(':')[2]})"
            ) from None
        raise ConfigError(
            f"reward function '{spec}': importing {target} raised {type(error).__name__}: {error}"
        ) from error


def _keyword_parameters(fn: Callable[..., Any]) -> tuple[frozenset[str] | None, frozenset[str]]:
    """(the keyword names ``fn`` accepts, None when it takes ``**kwargs``; the names it requires)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: offer everything
        return None, frozenset()
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = frozenset(p.name for p in named if p.default is p.empty)
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None, required
    return frozenset(p.name for p in named), required


# ---------------------------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------------------------
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
        _check_batch(prompts, completions, fields)
        if self.scorer is None:
            self.scorer = load_scorer(self.path, self.batch_size, self.max_length)
        scores = self.scorer.score(list(prompts), list(completions))
        return check_rewards(scores, len(completions), f"reward model {self.path}")


# ---------------------------------------------------------------------------------------------
# Rules: each scores one completion's text on its own
# ---------------------------------------------------------------------------------------------
REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE, "a": re.ASCII}


class RegexRule:
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

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], **fields: Sequence[Any]
    ) -> list[float]:
        return [self.score(completion_text(c)) for c in completions]


LENGTH_UNITS: dict[str, Callable[[str], int]] = {"words": lambda text: len(text.split()), "chars": len}


class LengthRule:
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

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], **fields: Sequence[Any]
    ) -> list[float]:
        return [self.score(completion_text(c)) for c in completions]


KEYWORD_MODES = ("any", "all", "count")


class KeywordRule:
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

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], **fields: Sequence[Any]
    ) -> list[float]:
        return [self.score(completion_text(c)) for c in completions]


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


class FormatRule:
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

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[Completion], **fields: Sequence[Any]
    ) -> list[float]:
        return [self.score(completion_text(c)) for c in completions]


# ---------------------------------------------------------------------------------------------
# Weighted sums
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Building from a config
# ---------------------------------------------------------------------------------------------
def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):  # float(True) is 1.0: a typo must not become a weight
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:  # YAML reads "1e-3" (no dot) as a string
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def _integer(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _positive_integer(value: Any, where: str) -> int:
    number = _integer(value, where)
    if number < 1:
        raise ConfigError(f"{where}: expected an integer ≥ 1, got {value!r}")
    return number


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: expected a non-empty list of strings, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _scalar(value: Any, where: str) -> str | int:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected a string or an integer, got {value!r}")


Schema = dict[str, Callable[[Any, str], Any]]

SOURCE_KEYS = ("model", "function", "rule", "sum")
# Keys a sum's entry may carry beside its source.
PART_SCHEMA: Schema = {"weight": _number, "normalize": _string}
MODEL_SCHEMA: Schema = {"model": _string, "batch_size": _positive_integer, "max_length": _positive_integer}
FUNCTION_SCHEMA: Schema = {"function": _string}
# rule name: (class, its keys, the keys it requires)
RULES: dict[str, tuple[type, Schema, tuple[str, ...]]] = {
    "regex": (
        RegexRule,
        {"pattern": _string, "match": _number, "miss": _number, "flags": _string, "search": _flag},
        ("pattern",),
    ),
    "length": (LengthRule, {"min": _integer, "max": _integer, "unit": _string, "scale": _number}, ()),
    "keywords": (
        KeywordRule,
        {"words": _strings, "mode": _string, "case_sensitive": _flag, "reward": _number, "forbidden": _flag},
        ("words",),
    ),
    "format": (FormatRule, {"kind": _string, "value": _scalar}, ("kind",)),
}


def build_reward(spec: Any, where: str = "reward", name: str | None = None) -> RewardSource:
    """The reward source a config mapping describes: exactly one of ``model``, ``function``,
    ``rule`` or ``sum`` (see the module docstring). ``where`` is the spec's dotted path, named in
    every ConfigError; ``name`` defaults to ``model:PATH``, ``function:SPEC``, ``rule:KIND`` or
    ``sum``, and a sum's sources are named by their keys."""
    return _build(spec, where, name, extra={})


def load_reward_file(path: str | Path) -> RewardSource:
    """The reward source a YAML file describes; errors name the file, then the key."""
    path = Path(path)
    spec = read_yaml(path, what="reward file")
    try:
        return build_reward(spec)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _build(spec: Any, where: str, name: str | None, extra: Schema) -> RewardSource:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping with one of {', '.join(SOURCE_KEYS)}, got {spec!r}")
    present = [key for key in SOURCE_KEYS if key in spec]
    if len(present) > 1:
        one_of = ", ".join(SOURCE_KEYS)
        raise ConfigError(
            f"{where}: has both '{present[0]}' and '{present[1]}'; a reward takes exactly one of {one_of}"
        )
    if not present:
        raise ConfigError(_no_source_message(spec, where, extra))
    kind = present[0]
    if kind == "model":
        values = _read(spec, MODEL_SCHEMA, where, extra)
        path = values.pop("model")
        if not Path(path).expanduser().exists():
            raise ConfigError(
                f"{where}.model: '{path}' not found; give the folder `alignloop reward` saved (runs/NAME/final)"
            )
        return ModelReward(path, **values, name=name or f"model:{path}")
    if kind == "function":
        spec_text = _read(spec, FUNCTION_SCHEMA, where, extra)["function"]
        with _located(where):
            return FunctionReward(spec_text, name=name or f"function:{spec_text}")
    if kind == "rule":
        return _build_rule(spec, where, name, extra)
    return _build_sum(spec, where, name, extra)


def _build_rule(spec: Mapping[str, Any], where: str, name: str | None, extra: Schema) -> RewardSource:
    rule = spec["rule"]
    if not isinstance(rule, str) or rule not in RULES:
        close = difflib.get_close_matches(str(rule), RULES, n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}.rule: unknown rule {rule!r}{hint} (rules: {', '.join(RULES)})")
    cls, schema, required = RULES[rule]
    values = _read(spec, {"rule": _string, **schema}, where, extra)
    del values["rule"]
    for key in required:
        if key not in values:
            raise ConfigError(f"{where}.{key}: missing; a {rule} rule needs {', '.join(required)}")
    with _located(where):
        return cls(**values, name=name or f"rule:{rule}")


def _build_sum(spec: Mapping[str, Any], where: str, name: str | None, extra: Schema) -> RewardSource:
    entries = _read(spec, {"sum": _mapping}, where, extra)["sum"]
    if not entries:
        raise ConfigError(f"{where}.sum: empty; name at least one source (helpful: {{model: runs/rm/final}})")
    parts = []
    for key, entry in entries.items():
        entry_where = f"{where}.sum.{key}"
        source = _build(entry, entry_where, str(key), extra=PART_SCHEMA)
        weight = _number(entry["weight"], f"{entry_where}.weight") if "weight" in entry else 1.0
        normalize = _string(entry.get("normalize", "none"), f"{entry_where}.normalize")
        if normalize not in NORMALIZERS:
            close = difflib.get_close_matches(normalize, NORMALIZERS, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{entry_where}.normalize: {normalize!r} is not one of {', '.join(NORMALIZERS)}{hint}")
        parts.append((source, weight, normalize))
    with _located(where):
        return WeightedSum(parts, name=name or "sum")


def _read(spec: Mapping[str, Any], schema: Schema, where: str, extra: Schema) -> dict[str, Any]:
    """The keys of ``spec`` that ``schema`` names, converted; ``extra`` keys are allowed but left
    to the caller. Any other key is a ConfigError naming it and the closest valid key."""
    allowed = [*schema, *extra]
    values = {}
    for key, value in spec.items():
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(allowed)}"
            raise ConfigError(f"{where}.{key}: unknown key{hint}")
        if key in schema:
            values[key] = schema[key](value, f"{where}.{key}")
    return values


def _no_source_message(spec: Mapping[str, Any], where: str, extra: Schema) -> str:
    found = [str(key) for key in spec if key not in extra]
    one_of, found_text = ", ".join(SOURCE_KEYS), ", ".join(found) or "nothing"
    message = f"{where}: no reward source; give one of {one_of} (found: {found_text})"
    for key in found:
        close = difflib.get_close_matches(key, SOURCE_KEYS, n=1)
        if close:
            return f"{message} — did you mean '{close[0]}' for '{key}'?"
    return message


@contextlib.contextmanager
def _located(where: str) -> Iterator[None]:
    """Prefix ConfigErrors raised by a source's constructor with the spec's dotted path."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
