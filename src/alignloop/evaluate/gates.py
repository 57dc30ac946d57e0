"""Promotion gates: ``"win_rate_lower>0.5,kl_per_token<0.1"`` parsed into conditions and checked on flat metrics.

A gate names keys of an evaluation's flat ``metrics.json`` (``compare.METRIC_KEYS`` for generation,
``classifier.metric_keys`` for classifiers); ``alignloop evaluate`` exits 1 and the loop refuses to
promote when one fails.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from alignloop.errors import ConfigError
from alignloop.report.stats import is_number

# op → (test, how it reads, how its negation reads)
OPS: dict[str, tuple[Callable[[float, float], bool], str, str]] = {
    ">": (operator.gt, ">", "≤"),
    ">=": (operator.ge, "≥", "<"),
    "<": (operator.lt, "<", "≥"),
    "<=": (operator.le, "≤", ">"),
    "==": (operator.eq, "=", "≠"),
}
_CLAUSE = re.compile(r"\s*([A-Za-z_][\w./-]*)\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")
GATE_SYNTAX = "comma-separated `metric OP number`, OP one of > >= < <= ==, e.g. \"win_rate_lower>0.5,kl_per_token<0.1\""


@dataclass(frozen=True)
class Condition:
    """One gate clause: ``metric op threshold``, e.g. ``win_rate_lower > 0.5``."""

    metric: str  # a flat key of metrics.json
    op: str  # one of OPS
    threshold: float


def parse_gate(text: str, known: Sequence[str] | None = None) -> list[Condition]:
    """``"win_rate_lower>0.5,kl_per_token<0.1,reward_delta>=0"`` → one :class:`Condition` per clause.

    A clause that is not ``metric OP number`` raises :class:`ConfigError` naming it. With ``known``
    (e.g. ``compare.METRIC_KEYS``) an unknown metric is refused here too, with the closest name, so a typo
    fails before an hour of generation rather than after.
    """
    if not text.strip():
        raise ConfigError(f"empty gate; write {GATE_SYNTAX}")
    conditions = []
    for i, clause in enumerate(text.split(","), start=1):
        match = _CLAUSE.fullmatch(clause)
        if match is None:
            raise ConfigError(f"gate clause {i} {clause.strip()!r} is not {GATE_SYNTAX}")
        metric, op, number = match.groups()
        if known is not None and metric not in known:
            close = difflib.get_close_matches(metric, sorted(known), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known metrics: {', '.join(sorted(known))}"
            raise ConfigError(f"gate clause {i} {clause.strip()!r}: unknown metric '{metric}'{hint}")
        conditions.append(Condition(metric, op, float(number)))
    return conditions


def check_gate(conditions: Sequence[Condition], metrics: dict) -> tuple[bool, list[str]]:
    """Whether every condition holds on ``metrics``, and one reason per condition.

    ``"win_rate_lower 0.53 > 0.5 ✓"`` / ``"kl_per_token 0.31 ≥ 0.1 ✗ (needs < 0.1)"``. A metric not
    in ``metrics``, or one that is None (undefined on this data) or not a finite number, fails.
    """
    passed, reasons = True, []
    for cond in conditions:
        test, reads, negation = OPS[cond.op]
        value = metrics.get(cond.metric)
        if cond.metric not in metrics:
            available = sorted(k for k, v in metrics.items() if is_number(v))
            close = difflib.get_close_matches(cond.metric, available, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            reasons.append(f"metric '{cond.metric}' not computed (available: {', '.join(available)}){hint} ✗")
            passed = False
        elif not is_number(value) or not math.isfinite(value):
            reasons.append(f"{cond.metric} is {value!r}, not a number it can compare ✗ (needs {reads} "
                           f"{cond.threshold:g})")
            passed = False
        elif test(value, cond.threshold):
            reasons.append(f"{cond.metric} {_shown(value, cond.threshold)} {reads} {cond.threshold:g} ✓")
        else:
            reasons.append(f"{cond.metric} {_shown(value, cond.threshold)} {negation} {cond.threshold:g} ✗ "
                           f"(needs {reads} {cond.threshold:g})")
            passed = False
    return passed, reasons


def _shown(value: float, threshold: float) -> str:
    """4 significant digits, or all of them where rounding would print the threshold ("0.5 > 0.5")."""
    short = f"{value:.4g}"
    return repr(float(value)) if short == f"{threshold:g}" and value != threshold else short
