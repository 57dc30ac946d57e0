"""Reward sources from configs: a spec mapping (:func:`build_reward`), a YAML file holding one
(:func:`load_reward_file`), or the string a stage's ``reward`` field holds
(:func:`build_reward_source`). Every error names the spec's dotted path, and the file if any."""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from alignloop.config import coerce, read_yaml
from alignloop.errors import ConfigError
from alignloop.rollout.rewards.combine import NORMALIZERS, WeightedSum
from alignloop.rollout.rewards.functions import FunctionReward
from alignloop.rollout.rewards.model import ModelReward
from alignloop.rollout.rewards.protocol import RewardSource
from alignloop.rollout.rewards.rules import FormatRule, KeywordRule, LengthRule, RegexRule

# What each key's value must be: a type, converted by the config's own rules (config.coerce), so a
# reward spec reads numbers and flags as a config file does; or a function (value, where) -> value
# for the constraints and shapes a config field type cannot state.
Schema = dict[str, Any]


def _string(value: Any, where: str) -> str:
    text = coerce(value, str, where)
    if not text:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return text


def _number(value: Any, where: str) -> float:
    number = coerce(value, float, where)
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def _positive_integer(value: Any, where: str) -> int:
    number = coerce(value, int, where)
    if number < 1:
        raise ConfigError(f"{where}: expected an integer ≥ 1, got {value!r}")
    return number


def _strings(value: Any, where: str) -> list[str]:
    # A YAML list only: config.coerce would split "paris, france", but here a bare word is more
    # likely a forgotten pair of brackets than a list.
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


def _convert(kind: Any, value: Any, where: str) -> Any:
    return coerce(value, kind, where) if isinstance(kind, type) else kind(value, where)


SOURCE_KEYS = ("model", "function", "rule", "sum")
# Keys a sum's entry may carry beside its source.
PART_SCHEMA: Schema = {"weight": _number, "normalize": _string}
MODEL_SCHEMA: Schema = {"model": _string, "batch_size": _positive_integer, "max_length": _positive_integer}
FUNCTION_SCHEMA: Schema = {"function": _string}
# rule name: (class, its keys, the keys it requires)
RULES: dict[str, tuple[type, Schema, tuple[str, ...]]] = {
    "regex": (
        RegexRule,
        {"pattern": _string, "match": _number, "miss": _number, "flags": _string, "search": bool},
        ("pattern",),
    ),
    "length": (LengthRule, {"min": int, "max": int, "unit": _string, "scale": _number}, ()),
    "keywords": (
        KeywordRule,
        {"words": _strings, "mode": _string, "case_sensitive": bool, "reward": _number, "forbidden": bool},
        ("words",),
    ),
    "format": (FormatRule, {"kind": _string, "value": _scalar}, ("kind",)),
}



def build_reward(spec: Any, where: str = "reward", name: str | None = None) -> RewardSource:
    """The reward source a config mapping describes: exactly one of ``model``, ``function``,
    ``rule`` or ``sum`` (see :mod:`alignloop.rollout.rewards`). ``where`` is the spec's dotted path, named in
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


def build_reward_source(spec: str) -> RewardSource:
    """The source a stage's ``reward`` string names: a reward-model folder, a YAML reward spec
    (``.yaml``/``.yml``), or a function (``file.py:fn`` / ``module:fn``)."""
    path = Path(spec)
    if path.is_dir():
        return build_reward({"model": spec})
    if path.suffix in (".yaml", ".yml"):
        return load_reward_file(path)
    if ":" in spec:
        return build_reward({"function": spec})
    raise ConfigError(f"reward: {spec!r} is not a reward-model folder, a YAML reward spec or a `file.py:fn` function")


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
            values[key] = _convert(schema[key], value, f"{where}.{key}")
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
