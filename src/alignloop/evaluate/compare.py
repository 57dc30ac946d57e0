"""Is the candidate better than the baseline? Win rate, reward, KL, length and diversity on the same prompts.

``alignloop evaluate`` generates one completion per held-out prompt from a candidate and a baseline
model, scores both, and passes plain numbers here: per-prompt outcomes, rewards, lengths, texts and
per-token log-probabilities. Nothing in this module needs torch or a model, so every number is
checkable by hand on a few prompts.

The pieces compose into one flat ``metrics.json`` (:func:`flatten_metrics`), whose keys a gate such
as ``"win_rate_lower>0.5,kl_per_token<0.1"`` names (:func:`parse_gate`, :func:`check_gate`), and a
``report.md`` whose first line is the verdict (:func:`write_comparison_report`).

Flat metric keys (``METRIC_TABLE`` and ``SIDE_TABLE`` say what each means):

* comparison: ``prompts``, ``wins``, ``ties``, ``losses``, ``win_rate``, ``win_rate_lower``,
  ``win_rate_upper``, ``win_rate_excluding_ties``, ``tie_rate``, ``win_rate_ci_method``,
  ``win_rate_confidence``, ``reward_delta``, ``length_delta``, ``kl_mean``, ``kl_std``,
  ``kl_per_token``, ``kl_k3_mean``, ``kl_k3_per_token``, ``kl_sequences``, ``kl_tokens``
* per model, as ``candidate_<key>`` and ``baseline_<key>``: ``completions``, ``reward_mean``,
  ``reward_std``, ``reward_median``, ``reward_min``, ``reward_max``, ``length_mean``,
  ``length_median``, ``length_p10``, ``length_p90``, ``length_max``, ``length_std``,
  ``reward_length_pearson``, ``reward_length_spearman``, ``distinct_1``, ``distinct_2``,
  ``repetition_4``, ``ppl``
"""

from __future__ import annotations

import difflib
import html
import json
import math
import operator
import os
import re
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignloop.errors import ConfigError
from alignloop.evaluate.reward_quality import LENGTH_CORR_WARN, pearson, spearman, wilson_interval

REPETITION_RISE_WARN = 0.1  # candidate completions with a repeated 4-gram this much more often: collapse


# ---- win rate -----------------------------------------------------------------------------------------------

def judge_outcomes(candidate_scores: Sequence[float], baseline_scores: Sequence[float],
                   epsilon: float = 0.0) -> list[int]:
    """Per prompt: +1 if the candidate scores higher, −1 if lower, 0 (tie) if |s_c − s_b| ≤ ε.

    >>> judge_outcomes([1.0, 0.5, 0.2], [0.0, 0.45, 0.9], epsilon=0.1)
    [1, 0, -1]
    """
    c, b = _finite_1d(candidate_scores, "candidate_scores"), _finite_1d(baseline_scores, "baseline_scores")
    if c.shape != b.shape:
        raise ValueError(f"candidate_scores has {len(c)} scores and baseline_scores {len(b)}; give one per prompt")
    if not epsilon >= 0.0:
        raise ValueError(f"epsilon is the tie tolerance and must be ≥ 0, got {epsilon}")
    diff = c - b
    return [int(o) for o in np.where(diff > epsilon, 1, np.where(diff < -epsilon, -1, 0))]


def win_rate(
    outcomes: Sequence[int],
    ci: str = "wilson",
    confidence: float = 0.95,
    bootstrap_samples: int = 2000,
    seed: int = 0,
) -> dict:
    """Win rate of the candidate over n prompts, ties counting half, with a confidence interval.

    With W wins, T ties and L losses (outcome +1, 0, −1 per prompt), n = W + T + L:

        win_rate                = (W + ½T) / n          the mean per-prompt score s ∈ {1, ½, 0}
        win_rate_excluding_ties = W / (W + L)           None when every prompt is a tie
        tie_rate                = T / n

    ``ci`` picks the interval [win_rate_lower, win_rate_upper]:

    ``"wilson"``
        The Wilson score interval of W + ½T successes in n trials (:func:`wilson_interval`), z the
        two-sided normal quantile of ``confidence``. It treats each prompt as a Bernoulli trial; a
        tie has variance 0 around ½ where a coin flip has ¼, so with ties the interval is
        conservative (wider than the truth), never too narrow.
    ``"bootstrap"``
        Percentile bootstrap over prompts: resample n prompts with replacement B =
        ``bootstrap_samples`` times and take the (α/2, 1 − α/2) quantiles of the resampled win
        rates, α = 1 − ``confidence``. Resampling prompts only changes how many wins, ties and
        losses are drawn, so each resample is one multinomial draw of (W*, T*, L*) with
        probabilities (W, T, L)/n: the same distribution in O(B) memory, not O(B·n). Seeded by
        ``seed``. It collapses to a point when every outcome is the same (e.g. all ties).

    Returns ``wins, ties, losses, n, win_rate, win_rate_lower, win_rate_upper,
    win_rate_excluding_ties, tie_rate, ci_method, confidence``.
    """
    scores = np.asarray(outcomes)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"outcomes must be a non-empty list of +1/0/−1 per prompt, got shape {scores.shape}")
    bad = ~np.isin(scores, (-1, 0, 1))
    if bad.any():
        raise ValueError(f"outcomes must be +1 (win), 0 (tie) or −1 (loss); got {scores[bad][0].item()!r} "
                         f"at prompt {int(np.flatnonzero(bad)[0])}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(scores)
    wins, ties, losses = int(np.sum(scores == 1)), int(np.sum(scores == 0)), int(np.sum(scores == -1))
    rate = (wins + 0.5 * ties) / n
    if ci == "wilson":
        z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
        lower, upper = wilson_interval(wins + 0.5 * ties, n, z)
    elif ci == "bootstrap":
        if bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples must be ≥ 1, got {bootstrap_samples}")
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(n, [wins / n, ties / n, losses / n], size=bootstrap_samples)  # (B, 3)
        resampled = (counts[:, 0] + 0.5 * counts[:, 1]) / n
        alpha = 1.0 - confidence
        lower, upper = (float(q) for q in np.quantile(resampled, [alpha / 2, 1 - alpha / 2]))
    else:
        raise ValueError(f"ci must be 'wilson' or 'bootstrap', got {ci!r}")
    return {
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "n": n,
        "win_rate": rate,
        "win_rate_lower": lower,
        "win_rate_upper": upper,
        "win_rate_excluding_ties": wins / (wins + losses) if wins + losses else None,
        "tie_rate": ties / n,
        "ci_method": ci,
        "confidence": confidence,
    }


# ---- KL between candidate and baseline ------------------------------------------------------------------------

def kl_summary(candidate_logprobs: Sequence[Sequence[float]], baseline_logprobs: Sequence[Sequence[float]]) -> dict:
    """KL(π_c ‖ π_b) estimated from the candidate's own samples, per sequence and per token.

    Each sequence i is a completion y ~ π_c(·|x) of the candidate; ``candidate_logprobs[i][t]`` is
    log π_c(y_t | x, y_<t) and ``baseline_logprobs[i][t]`` the baseline's log-prob of the same token.
    With log-ratio r_t = log π_b(y_t|·) − log π_c(y_t|·) (Schulman, "Approximating KL Divergence",
    2020, http://joschu.net/blog/kl-approx.html):

        k1_i = Σ_t −r_t = Σ_t (log π_c − log π_b)
            unbiased for the sequence KL(π_c ‖ π_b)(x) = E_y[log π_c(y|x) − log π_b(y|x)] by the chain
            rule; a single sample can be negative.
        k3_t = (e^{r_t} − 1) − r_t ≥ 0
            E over y_t ~ π_c(·|y_<t) of e^{r_t} − 1 is 0 (when π_b's support lies inside π_c's), so k3_t
            is unbiased for the per-token KL given the prefix, and Σ_t k3_t again for the sequence
            KL; never negative and of lower variance when π_c ≈ π_b.

    Returns (N sequences, L_i tokens in sequence i, L = Σ_i L_i):

        kl_mean         = (1/N) Σ_i k1_i              nats per sequence
        kl_std          = population std of k1_i over sequences
        kl_per_token    = Σ_i k1_i / L                 None when L = 0
        kl_k3_mean      = (1/N) Σ_i Σ_t k3_t
        kl_k3_per_token = Σ_i Σ_t k3_t / L             None when L = 0
        kl_sequences = N, kl_tokens = L
    """
    if len(candidate_logprobs) != len(baseline_logprobs):
        raise ValueError(f"candidate_logprobs has {len(candidate_logprobs)} sequences and baseline_logprobs "
                         f"{len(baseline_logprobs)}; both score the same candidate completions")
    if len(candidate_logprobs) == 0:
        raise ValueError("no sequences: kl_summary needs at least one candidate completion")
    k1, k3, tokens = [], [], 0
    for i, (c_seq, b_seq) in enumerate(zip(candidate_logprobs, baseline_logprobs)):
        c, b = np.asarray(c_seq, dtype=float), np.asarray(b_seq, dtype=float)
        if c.shape != b.shape or c.ndim != 1:
            raise ValueError(f"sequence {i}: {c.shape} candidate log-probs but {b.shape} baseline log-probs; "
                             "give one log-prob per completion token from each model")
        for name, a in (("candidate", c), ("baseline", b)):
            if not np.all(np.isfinite(a)) or np.any(a > 1e-4):  # tolerance: a low-precision log_softmax of ~0
                raise ValueError(f"sequence {i}: {name} log-probs must be finite and ≤ 0 (log-probabilities, "
                                 "not logits)")
        r = b - c
        k1.append(float(np.sum(-r)))
        k3.append(float(np.sum(np.expm1(r) - r)))  # expm1: no cancellation in e^r − 1 for r ≈ 0
        tokens += len(c)
    return {
        "kl_mean": float(np.mean(k1)),
        "kl_std": float(np.std(k1)),
        "kl_per_token": sum(k1) / tokens if tokens else None,
        "kl_k3_mean": float(np.mean(k3)),
        "kl_k3_per_token": sum(k3) / tokens if tokens else None,
        "kl_sequences": len(k1),
        "kl_tokens": tokens,
    }


def perplexity(token_logprobs: Sequence[Sequence[float]]) -> float | None:
    """exp(−Σ log p / L) over all L tokens of all sequences (token-weighted, like a held-out loss); None if L = 0."""
    total = [float(x) for seq in token_logprobs for x in seq]
    return math.exp(-sum(total) / len(total)) if total else None


# ---- lengths, diversity and rewards --------------------------------------------------------------------------

def length_stats(lengths: Sequence[float]) -> dict:
    """``mean, median, p10, p90, max, std`` (population) of completion lengths, in the caller's unit."""
    x = _finite_1d(lengths, "lengths")
    p10, median, p90 = np.percentile(x, [10, 50, 90])
    return {"mean": float(np.mean(x)), "median": float(median), "p10": float(p10), "p90": float(p90),
            "max": float(np.max(x)), "std": float(np.std(x))}


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The whitespace-token n-grams of one completion, in order (none when it has fewer than n tokens)."""
    tokens = text.split()
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """distinct-n (Li et al., 2016): unique n-grams / total n-grams, pooled over all completions.

    Tokens are whitespace-separated words; n-grams do not cross completions. 1.0 means no n-gram
    occurs twice anywhere; a collapsing policy that repeats itself drives it down. None when no
    completion has n tokens.

    >>> distinct_n(["a b a b", "a b c"], 2)  # (a b) (b a) (a b) | (a b) (b c): 3 unique of 5
    0.6
    """
    _check_order(n)
    grams = [g for text in texts for g in _ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition_rate(texts: Sequence[str], n: int = 4) -> float | None:
    """Share of completions in which some n-gram occurs at least twice: the degenerate-loop signal.

    A completion with fewer than n + 1 tokens cannot repeat and counts as not repeating. None when
    ``texts`` is empty.

    >>> repetition_rate(["a b a b", "a b c", "x"], n=2)
    0.3333333333333333
    """
    _check_order(n)
    if len(texts) == 0:
        return None
    repeated = [max(Counter(_ngrams(text, n)).values(), default=0) >= 2 for text in texts]
    return sum(repeated) / len(repeated)


def reward_summary(scores: Sequence[float]) -> dict:
    """``mean, std`` (population), ``median, min, max, n`` of the rewards of one model's completions."""
    x = _finite_1d(scores, "scores")
    return {"mean": float(np.mean(x)), "std": float(np.std(x)), "median": float(np.median(x)),
            "min": float(np.min(x)), "max": float(np.max(x)), "n": len(x)}


def reward_length_correlation(scores: Sequence[float], lengths: Sequence[float]) -> dict:
    """Pearson and Spearman of reward against length: the reward-hacking alarm.

    A policy optimised against a length-biased reward model learns to write longer, not better; a
    strong positive correlation on its completions (above ``LENGTH_CORR_WARN``), together with
    lengths growing over the baseline, is the sign. Each is None when an input is constant.
    """
    x, y = _finite_1d(lengths, "lengths"), _finite_1d(scores, "scores")
    if x.shape != y.shape:
        raise ValueError(f"{len(y)} scores but {len(x)} lengths; give one of each per completion")
    return {"pearson": pearson(x, y), "spearman": spearman(x, y)}


def completion_metrics(
    rewards: Sequence[float] | None = None,
    lengths: Sequence[float] | None = None,
    texts: Sequence[str] | None = None,
    ppl: float | None = None,
    distinct_orders: Sequence[int] = (1, 2),
    repetition_n: int = 4,
) -> dict:
    """One model's completions as flat, unprefixed keys (``SIDE_TABLE``); inputs left None are skipped.

    ``reward_*`` from :func:`reward_summary`, ``length_*`` from :func:`length_stats`,
    ``reward_length_pearson``/``_spearman`` when both are given, ``distinct_<n>`` per order,
    ``repetition_<n>``, and ``ppl`` as passed (e.g. :func:`perplexity` of held-out text).
    """
    out: dict = {}
    counts = {len(x) for x in (rewards, lengths, texts) if x is not None}
    if len(counts) > 1:
        raise ValueError(f"rewards, lengths and texts must describe the same completions, got lengths {counts}")
    if counts:
        out["completions"] = counts.pop()
    if rewards is not None:
        out.update({f"reward_{k}": v for k, v in reward_summary(rewards).items() if k != "n"})
    if lengths is not None:
        out.update({f"length_{k}": v for k, v in length_stats(lengths).items()})
    if rewards is not None and lengths is not None:
        corr = reward_length_correlation(rewards, lengths)
        out["reward_length_pearson"], out["reward_length_spearman"] = corr["pearson"], corr["spearman"]
    if texts is not None:
        out.update({f"distinct_{n}": distinct_n(texts, n) for n in distinct_orders})
        out[f"repetition_{repetition_n}"] = repetition_rate(texts, repetition_n)
    if ppl is not None:
        out["ppl"] = float(ppl)
    return out


def flatten_metrics(candidate: dict, baseline: dict, win: dict | None = None, kl: dict | None = None) -> dict:
    """The flat ``metrics.json`` of an evaluation, whose keys a gate names.

    ``candidate`` and ``baseline`` are :func:`completion_metrics` dicts, prefixed ``candidate_`` and
    ``baseline_``; ``win`` a :func:`win_rate` dict (its ``n`` becomes ``prompts``, ``ci_method`` and
    ``confidence`` become ``win_rate_ci_method`` and ``win_rate_confidence``); ``kl`` a
    :func:`kl_summary` dict, kept as is. Where both sides have them:

        reward_delta = candidate_reward_mean − baseline_reward_mean
        length_delta = candidate_length_mean − baseline_length_mean
    """
    flat: dict = {}
    if win is not None:
        renamed = {"n": "prompts", "ci_method": "win_rate_ci_method", "confidence": "win_rate_confidence"}
        flat.update({renamed.get(k, k): v for k, v in win.items()})
    for key in ("reward_mean", "length_mean"):
        if key in candidate and key in baseline:
            flat[key.replace("_mean", "_delta")] = candidate[key] - baseline[key]
    if kl is not None:
        flat.update(kl)
    flat.update({f"candidate_{k}": v for k, v in candidate.items()})
    flat.update({f"baseline_{k}": v for k, v in baseline.items()})
    return flat


METRIC_TABLE = (  # (flat key, what it means) in the order a reader checks them
    ("prompts", "held-out prompts compared"),
    ("win_rate", "(wins + ½ ties) / prompts"),
    ("win_rate_lower", "lower end of the win-rate confidence interval"),
    ("win_rate_upper", "upper end of the win-rate confidence interval"),
    ("win_rate_excluding_ties", "wins / (wins + losses)"),
    ("tie_rate", "ties / prompts"),
    ("wins", "prompts where the candidate scored higher"),
    ("ties", "prompts scored equal (within ε)"),
    ("losses", "prompts where the baseline scored higher"),
    ("win_rate_ci_method", "wilson (ties as ½ a success) or bootstrap (percentile, over prompts)"),
    ("win_rate_confidence", "confidence level of the interval"),
    ("reward_delta", "mean reward, candidate − baseline"),
    ("length_delta", "mean length, candidate − baseline"),
    ("kl_mean", "KL(candidate ‖ baseline), nats per sequence (k1, mean over sequences)"),
    ("kl_std", "std over sequences of the per-sequence k1"),
    ("kl_per_token", "k1 summed over all tokens / tokens"),
    ("kl_k3_mean", "k3 estimator (≥ 0, lower variance), nats per sequence"),
    ("kl_k3_per_token", "k3 summed over all tokens / tokens"),
    ("kl_sequences", "candidate completions scored by both models"),
    ("kl_tokens", "their tokens"),
)
SIDE_TABLE = (  # (key after candidate_/baseline_, what it means)
    ("completions", "completions"),
    ("reward_mean", "mean reward"),
    ("reward_std", "std of rewards"),
    ("reward_median", "median reward"),
    ("reward_min", "lowest reward"),
    ("reward_max", "highest reward"),
    ("length_mean", "mean length"),
    ("length_median", "median length"),
    ("length_p10", "10th percentile length"),
    ("length_p90", "90th percentile length"),
    ("length_max", "longest completion"),
    ("length_std", "std of lengths"),
    ("reward_length_pearson", "Pearson(length, reward): high = reward hacking by length"),
    ("reward_length_spearman", "Spearman(length, reward)"),
    ("distinct_1", "unique / total words"),
    ("distinct_2", "unique / total word bigrams"),
    ("repetition_4", "share of completions repeating a 4-gram: collapse"),
    ("ppl", "perplexity"),
)
METRIC_KEYS = frozenset(
    [key for key, _ in METRIC_TABLE] + [f"{side}_{key}" for side in ("candidate", "baseline") for key, _ in SIDE_TABLE]
)


# ---- gate ----------------------------------------------------------------------------------------------------

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
    (e.g. ``METRIC_KEYS``) an unknown metric is refused here too, with the closest name, so a typo
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
            available = sorted(k for k, v in metrics.items() if _is_number(v))
            close = difflib.get_close_matches(cond.metric, available, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            reasons.append(f"metric '{cond.metric}' not computed (available: {', '.join(available)}){hint} ✗")
            passed = False
        elif not _is_number(value) or not math.isfinite(value):
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


# ---- plots ---------------------------------------------------------------------------------------------------

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    pyplot().close(fig)
    return Path(out)


def plot_reward_distributions(candidate: Sequence[float], baseline: Sequence[float], out: Path,
                              title: str = "candidate vs baseline") -> Path:
    """Overlaid histograms of both models' rewards on shared bins, each mean a dashed line."""
    plt = pyplot()
    c, b = _finite_1d(candidate, "candidate"), _finite_1d(baseline, "baseline")
    edges = np.histogram_bin_edges(np.concatenate([c, b]), bins=40)  # shared, so heights compare
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for scores, name, colour in ((b, "baseline", "tab:gray"), (c, "candidate", "tab:blue")):
        mean = float(np.mean(scores))
        ax.hist(scores, bins=edges, alpha=0.5, color=colour, label=f"{name} (n={len(scores):,})")
        ax.axvline(mean, color=colour, ls="--", lw=1.5, label=f"{name} mean {mean:.3g}")
    ax.set_xlabel("reward")
    ax.set_ylabel("completions")
    ax.set_title(f"{title}: reward distributions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def plot_length_vs_reward(candidate_lengths: Sequence[float], candidate_rewards: Sequence[float],
                          baseline_lengths: Sequence[float], baseline_rewards: Sequence[float], out: Path,
                          title: str = "candidate vs baseline", length_unit: str = "tokens") -> Path:
    """Scatter of completion length against reward for both models; the legend gives each Pearson r."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for lengths, rewards, name, colour in ((baseline_lengths, baseline_rewards, "baseline", "tab:gray"),
                                           (candidate_lengths, candidate_rewards, "candidate", "tab:blue")):
        corr = reward_length_correlation(rewards, lengths)["pearson"]
        alpha = float(np.clip(300 / max(len(rewards), 1), 0.08, 0.8))  # many points: fainter, so density shows
        ax.scatter(lengths, rewards, s=8, alpha=alpha, color=colour,
                   label=f"{name} (Pearson {'n/a' if corr is None else f'{corr:+.2f}'})")
    ax.set_xlabel(f"completion length ({length_unit})")
    ax.set_ylabel("reward")
    ax.set_title(f"{title}: length vs reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def plot_win_rate(win: dict, out: Path, title: str = "candidate vs baseline") -> Path:
    """One stacked bar of win / tie / loss shares, the win rate and its interval as an error bar, a line at 0.5."""
    plt = pyplot()
    n = win["n"]
    fig, ax = plt.subplots(figsize=(7.0, 2.6))
    left = 0.0
    for count, name, colour in ((win["wins"], "wins", "tab:green"), (win["ties"], "ties", "tab:gray"),
                                (win["losses"], "losses", "tab:red")):
        share = count / n
        ax.barh([0], [share], left=left, height=0.5, color=colour, alpha=0.7, label=f"{name} ({count:,})")
        if share >= 0.06:  # room for a label inside the segment
            ax.text(left + share / 2, 0, f"{share:.0%}", ha="center", va="center", fontsize=9)
        left += share
    rate, lo, hi = win["win_rate"], win["win_rate_lower"], win["win_rate_upper"]
    ax.errorbar([rate], [0], xerr=[[max(rate - lo, 0.0)], [max(hi - rate, 0.0)]], fmt="D", color="black",
                capsize=6, label=f"win rate {rate:.2f} [{lo:.2f}, {hi:.2f}]")
    ax.axvline(0.5, color="black", ls="--", lw=1, label="0.5: no better than baseline")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(-0.6, 0.6)
    ax.set_yticks([])
    ax.set_xlabel(f"share of {n:,} prompts (win rate counts a tie as ½; {win['confidence']:.0%} "
                  f"{win['ci_method']} interval)")
    ax.set_title(f"{title}: win rate")
    fig.legend(fontsize=8, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0.0, 0.25, 1.0, 1.0))  # the bottom quarter for the legend
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


FAMILIES = (  # (panel, y label, does a metric name belong); first match wins, so "rewards/kl" is KL
    ("KL", "nats", lambda key: "kl" in key.lower()),
    ("reward", "reward", lambda key: "reward" in key.lower()),
    ("loss", "loss", lambda key: "loss" in key.rsplit("/", 1)[-1].lower()),
)


def plot_run_curves(metrics_rows: Sequence[dict], out: Path, title: str) -> Path:
    """One panel per family logged in a run's ``metrics.jsonl`` rows (loss, reward, KL) against ``step``.

    A key joins the first family whose test it passes (``FAMILIES``): any key containing ``kl``, then
    ``reward``, then a last path segment containing ``loss`` (``train/loss``, ``eval/loss``). Eval
    keys are drawn with markers: they are logged sparsely. Rows without ``step`` use their index.
    With no such key the figure says so, so the report's image is never missing.
    """
    plt = pyplot()
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name, _, _ in FAMILIES}
    for i, row in enumerate(metrics_rows):
        step = row.get("step", i)
        for key, value in row.items():
            if key == "step" or not _is_number(value) or not math.isfinite(value):
                continue
            family = next((name for name, _, belongs in FAMILIES if belongs(key)), None)
            if family is not None:
                panels[family].setdefault(key, []).append((step, value))
    shown = [(name, ylabel) for name, ylabel, _ in FAMILIES if panels[name]][::-1]  # loss, reward, KL
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(4.6 * max(len(shown), 1), 3.6), squeeze=False)
    if not shown:
        axes[0][0].text(0.5, 0.5, "no loss, reward or KL metrics logged", ha="center", va="center")
        axes[0][0].set_axis_off()
        axes[0][0].set_title(title)
    for ax, (name, ylabel) in zip(axes[0], shown):
        for key, points in sorted(panels[name].items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key.startswith("eval") else None, ms=3, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out)


# ---- report: metrics.json and report.md ---------------------------------------------------------------------

def comparison_verdict(metrics: dict, length_unit: str = "tokens") -> str:
    """The plain-English first paragraph: win rate, reward, KL and lengths, then any alarm, from flat metrics.

    "candidate wins 61% [55%, 67%] of 200 prompts against baseline; reward +0.42; KL 3.1 nats/sequence;
    lengths 48 → 52 tokens." Parts whose metrics are absent are left out.
    """
    parts = []
    if "win_rate" in metrics:
        lo, hi = metrics["win_rate_lower"], metrics["win_rate_upper"]
        part = (f"candidate wins {metrics['win_rate']:.0%} [{lo:.0%}, {hi:.0%}] of {metrics['prompts']:,} prompts "
                f"against baseline")
        if metrics.get("ties"):
            part += f" ({metrics['ties']:,} ties, counted as half)"
        if lo > 0.5:
            part += ", better than baseline"
        elif hi < 0.5:
            part += ", worse than baseline"
        else:
            part += ", not distinguishable from a tie"
        parts.append(part)
    if all(k in metrics for k in ("reward_delta", "baseline_reward_mean", "candidate_reward_mean")):
        parts.append(f"reward {metrics['reward_delta']:+.3g} ({metrics['baseline_reward_mean']:.3g} → "
                     f"{metrics['candidate_reward_mean']:.3g})")
    if "kl_mean" in metrics:
        parts.append(f"KL {metrics['kl_mean']:.3g} nats/sequence")
    if "candidate_length_mean" in metrics and "baseline_length_mean" in metrics:
        parts.append(f"lengths {metrics['baseline_length_mean']:.3g} → {metrics['candidate_length_mean']:.3g} "
                     f"{length_unit}")
    text = "; ".join(parts) + "." if parts else "No comparison metrics were computed."
    text = text[:1].upper() + text[1:]

    alarms = []
    corr = metrics.get("candidate_reward_length_pearson")
    if corr is not None and corr > LENGTH_CORR_WARN and metrics.get("length_delta", 0.0) > 0:
        alarms.append(f"the candidate writes longer and its reward follows length (Pearson {corr:+.2f}): "
                      "the reward gain may be length, not quality")
    rep_c, rep_b = metrics.get("candidate_repetition_4"), metrics.get("baseline_repetition_4")
    if rep_c is not None and rep_b is not None and rep_c - rep_b > REPETITION_RISE_WARN:
        alarms.append(f"{rep_c:.0%} of candidate completions repeat a 4-gram against {rep_b:.0%} of the "
                      "baseline's: a sign of collapse")
    if alarms:
        text += " Warning: " + "; ".join(alarms) + "."
    return text


def _cell(value) -> str:
    """A metric as a table cell: None as n/a, ints with separators, floats to 4 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not _is_number(value):
        return md_cell(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def md_cell(text: str, limit: int = 400) -> str:
    """Free text made safe for one markdown table cell: HTML escaped, pipes escaped, newlines as <br>.

    Cut at ``limit`` characters: a sample table is for a glance, not for reading whole completions.
    """
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "…"
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def _sample_cell(value) -> str:
    """A sample row's cell: numbers as in the metric tables, text escaped, a missing value empty."""
    if value is None:
        return ""
    return _cell(value) if _is_number(value) else md_cell(value)


def markdown_images(folder: Path, plots: dict[str, Path]) -> list[str]:
    """``![alt](path)`` lines, paths relative to the report's folder so the folder can be moved."""
    return [f"![{alt}]({Path(os.path.relpath(path, folder)).as_posix()})\n" for alt, path in plots.items()]


def _metric_tables(metrics: dict) -> list[str]:
    """A comparison table (``METRIC_TABLE`` order) and a candidate | baseline table, then any other keys."""
    lines = ["| metric | value | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | {_cell(metrics[key])} | {meaning} |" for key, meaning in METRIC_TABLE if key in metrics]
    described = {key for key, _ in METRIC_TABLE if key in metrics}
    present = {k.split("_", 1)[1] for k in metrics if k.startswith(("candidate_", "baseline_"))}
    side_keys = [(key, meaning) for key, meaning in SIDE_TABLE if key in present]
    side_keys += [(key, "") for key in sorted(present - {key for key, _ in SIDE_TABLE})]  # e.g. distinct_3
    if side_keys:
        lines += ["", "Per model (gate on `candidate_<metric>` or `baseline_<metric>`):", "",
                  "| metric | candidate | baseline | meaning |", "| --- | --- | --- | --- |"]
        for key, meaning in side_keys:
            lines.append(f"| `{key}` | {_cell(metrics.get(f'candidate_{key}'))} | "
                         f"{_cell(metrics.get(f'baseline_{key}'))} | {meaning} |")
            described |= {f"candidate_{key}", f"baseline_{key}"}
    others = [k for k in metrics if k not in described]
    if others:
        lines += ["", "| other metric | value |", "| --- | --- |",
                  *(f"| `{k}` | {_cell(metrics[k])} |" for k in others)]
    return lines


def write_comparison_report(
    folder: Path,
    metrics: dict,
    plots: dict[str, Path],
    gate_result: tuple[bool, list[str]] | None,
    samples: Sequence[dict],
    title: str,
    length_unit: str = "tokens",
) -> Path:
    """``metrics.json`` and ``report.md`` (verdict, gate, metric tables, images, sample rows) in ``folder``.

    ``metrics`` is :func:`flatten_metrics`' dict; ``plots`` maps alt text to PNGs already written
    (:func:`plot_win_rate` etc.); ``gate_result`` is :func:`check_gate`'s answer, also written to
    ``metrics.json`` as ``gate_passed`` and ``gate_reasons``; ``samples`` are a few rows
    (prompt, candidate, baseline, rewards: any keys) shown as a table, text escaped for markdown.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = dict(metrics)
    gate_lines = []
    if gate_result is not None:
        passed, reasons = gate_result
        record.update(gate_passed=passed, gate_reasons=list(reasons))
        gate_lines = [f"**Gate {'passed' if passed else 'FAILED'}:**", "", *(f"- {r}" for r in reasons), ""]
    (folder / "metrics.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")

    sample_lines = []
    if samples:
        columns = list(dict.fromkeys(key for row in samples for key in row))  # union, first-seen order
        sample_lines = [
            "## Samples", "",
            "| " + " | ".join(md_cell(c) for c in columns) + " |",
            "| " + " | ".join("---" for _ in columns) + " |",
            *("| " + " | ".join(_sample_cell(row.get(c)) for c in columns) + " |" for row in samples),
            "",
        ]
    text = "\n".join([
        f"# {title}",
        "",
        comparison_verdict(metrics, length_unit),
        "",
        *gate_lines,
        *_metric_tables(metrics),
        "",
        *markdown_images(folder, plots),
        *sample_lines,
        "Every number: `metrics.json`.",
    ])
    out = folder / "report.md"
    out.write_text(text.rstrip() + "\n")
    return out


# ---- helpers -------------------------------------------------------------------------------------------------

def _is_number(value) -> bool:
    """A real number, not a bool (True > 0.5 should not pass a gate)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _finite_1d(values: Sequence[float], name: str) -> np.ndarray:
    """A non-empty 1-D float array of finite values; the error names the input."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty list of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(x)))} non-finite value(s) (NaN or inf)")
    return x


def _check_order(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the n-gram order must be a positive integer, got {n!r}")
