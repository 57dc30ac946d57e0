"""Statistics the reports share: win rates with intervals, correlations, calibration, summaries.

Every function takes plain numbers and returns plain Python values (None, not NaN, where a
statistic is undefined), so each one is checkable by hand and its result survives ``json.dumps``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile, Φ⁻¹(0.975)
LENGTH_CORR_WARN = 0.3  # |Pearson(length, reward)| above this: length explains a visible share of the score


def is_number(value) -> bool:
    """A real number, not a bool (True > 0.5 should not pass a gate)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def finite_1d(values: Sequence[float], name: str) -> np.ndarray:
    """A non-empty 1-D float array of finite values; the error names the input."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty list of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(x)))} non-finite value(s) (NaN or inf)")
    return x


# ---- proportions and win rates ------------------------------------------------------------------------------

def wilson_interval(successes: float, n: int, z: float = Z_95) -> list[float]:
    """Wilson score interval for a proportion p̂ = successes / n.

        centre = (p̂ + z²/2n) / (1 + z²/n)
        half   = z / (1 + z²/n) · √(p̂(1 − p̂)/n + z²/4n²)

    Unlike the normal interval p̂ ± z√(p̂(1−p̂)/n) it stays inside [0, 1] and does not collapse to a
    point at p̂ = 0 or 1. ``successes`` may be fractional (a tie counts as half a success), which is
    why this is not scipy's ``binomtest(k, n).proportion_ci(method="wilson")``: that takes whole k.
    E.g. 8/10 → [0.490, 0.943]. Returns ``[lo, hi]`` (a list, so it survives a JSON round trip).
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0 trials, got {n}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1.0 - p) / n + z2 / (4 * n * n), 0.0))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def judge_outcomes(candidate_scores: Sequence[float], baseline_scores: Sequence[float],
                   epsilon: float = 0.0) -> list[int]:
    """Per prompt: +1 if the candidate scores higher, −1 if lower, 0 (tie) if |s_c − s_b| ≤ ε.

    >>> judge_outcomes([1.0, 0.5, 0.2], [0.0, 0.45, 0.9], epsilon=0.1)
    [1, 0, -1]
    """
    c, b = finite_1d(candidate_scores, "candidate_scores"), finite_1d(baseline_scores, "baseline_scores")
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


# ---- correlations -------------------------------------------------------------------------------------------

def _unless_constant(statistic, x: Sequence[float], y: Sequence[float]) -> float | None:
    """``statistic(x, y).statistic`` as a float; None when either input is constant, where scipy warns
    (warnings are errors in our tests) and returns NaN, which JSON cannot hold."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return None if np.ptp(x) == 0 or np.ptp(y) == 0 else float(statistic(x, y).statistic)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson r = Σ(x−x̄)(y−ȳ) / √(Σ(x−x̄)² · Σ(y−ȳ)²) (scipy); None when either input is constant."""
    from scipy.stats import pearsonr  # here, not above: a stage that only writes its curves need not load scipy

    return _unless_constant(pearsonr, x, y)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman ρ (scipy): Pearson r of the ranks, tied values sharing their mean rank; None when either
    input is constant."""
    from scipy.stats import spearmanr

    return _unless_constant(spearmanr, x, y)


def reward_length_correlation(scores: Sequence[float], lengths: Sequence[float]) -> dict:
    """Pearson and Spearman of reward against length: the reward-hacking alarm.

    A policy optimised against a length-biased reward model learns to write longer, not better; a
    strong positive correlation on its completions (above ``LENGTH_CORR_WARN``), together with
    lengths growing over the baseline, is the sign. Each is None when an input is constant.
    """
    x, y = finite_1d(lengths, "lengths"), finite_1d(scores, "scores")
    if x.shape != y.shape:
        raise ValueError(f"{len(y)} scores but {len(x)} lengths; give one of each per completion")
    return {"pearson": pearson(x, y), "spearman": spearman(x, y)}


# ---- summaries ----------------------------------------------------------------------------------------------

def length_stats(lengths: Sequence[float]) -> dict:
    """``mean, median, p10, p90, max, std`` (population) of completion lengths, in the caller's unit."""
    x = finite_1d(lengths, "lengths")
    p10, median, p90 = np.percentile(x, [10, 50, 90])
    return {"mean": float(np.mean(x)), "median": float(median), "p10": float(p10), "p90": float(p90),
            "max": float(np.max(x)), "std": float(np.std(x))}


def reward_summary(scores: Sequence[float]) -> dict:
    """``mean, std`` (population), ``median, min, max, n`` of the rewards of one model's completions."""
    x = finite_1d(scores, "scores")
    return {"mean": float(np.mean(x)), "std": float(np.std(x)), "median": float(np.median(x)),
            "min": float(np.min(x)), "max": float(np.max(x)), "n": len(x)}


# ---- calibration of P(chosen wins) = σ(margin) ----------------------------------------------------------

def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) = 1 / (1 + e^{−x}) as exp(−softplus(−x)): no overflow warning for large |x|."""
    return np.exp(-np.logaddexp(0.0, -x))


def brier_of_margins(margins: np.ndarray) -> float:
    """(1/N) Σ_i (1 − σ(m_i))²: the Brier score of σ(m) when the chosen response always won (sklearn)."""
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(np.ones(len(margins), dtype=int), sigmoid(margins)))


def log_loss_of_margins(margins: np.ndarray) -> float:
    """(1/N) Σ_i −log σ(m_i) = (1/N) Σ_i softplus(−m_i), the Bradley–Terry training loss. Not sklearn's
    ``log_loss``: it takes σ(m), 0 in float64 below m ≈ −37, and clips it at machine epsilon, so a
    confidently wrong pair would count ~36 nats whatever its margin; softplus is exact."""
    return float(np.mean(np.logaddexp(0.0, -margins)))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int) -> list[dict]:
    """Equal-width bins over [0.5, 1.0] of the predicted winner's confidence.

    Bin b covers [lo_b, hi_b) (the last bin also holds 1.0). Each bin reports its ``count`` n_b,
    ``mean_confidence`` conf_b and ``accuracy`` acc_b (mean of ``correct``); empty bins keep their
    place with count 0 and None for both means, so bin i is always ``[i]``.

    Not sklearn's ``calibration_curve``: it needs 0/1 outcomes (here a tie is ½ correct), bins
    [0, 1] rather than the winner's [0.5, 1], drops empty bins and returns no counts, which the
    ECE weights and the reliability diagram need.
    """
    edges = np.linspace(0.5, 1.0, bins + 1)
    index = np.searchsorted(edges[1:-1], confidence, side="right")  # inner edges only: 0.5 → 0, 1.0 → last
    out = []
    for b in range(bins):
        in_bin = index == b
        count = int(np.sum(in_bin))
        out.append({
            "lo": float(edges[b]),
            "hi": float(edges[b + 1]),
            "count": count,
            "mean_confidence": float(np.mean(confidence[in_bin])) if count else None,
            "accuracy": float(np.mean(correct[in_bin])) if count else None,
        })
    return out


# ---- F1 differences between two classifiers on the same examples ------------------------------------------

def label_f1_counts(gold: Sequence, predicted: Sequence, labels: Sequence) -> np.ndarray:
    """Per example and label, its contribution (TP, FP, FN) to that label's F1: shape (N, K, 3).

    Example i with gold g and prediction p adds a TP to label g when p = g, else an FN to g and an
    FP to p. Summing over any multiset of examples gives the counts that multiset's F1 is computed
    from, which is what lets :func:`paired_bootstrap_f1_delta` resample examples cheaply.
    """
    index = {label: k for k, label in enumerate(labels)}
    counts = np.zeros((len(gold), len(labels), 3), dtype=np.int64)
    for i, (g, p) in enumerate(zip(gold, predicted, strict=True)):
        if g == p:
            counts[i, index[g], 0] = 1
        else:
            counts[i, index[g], 2] = 1
            counts[i, index[p], 1] = 1
    return counts


def entity_f1_counts(gold_tags: Sequence[Sequence[str]], predicted_tags: Sequence[Sequence[str]],
                     types: Sequence[str]) -> np.ndarray:
    """Per sentence and entity type, (TP, FP, FN) of exact-match entity spans: shape (N, T, 3).

    Spans are decoded by seqeval's ``get_entities`` (the conlleval rule, as ``ner_report`` scores),
    so summed over all sentences these are seqeval's per-type counts.
    """
    from seqeval.metrics.sequence_labeling import get_entities

    index = {t: k for k, t in enumerate(types)}
    counts = np.zeros((len(gold_tags), len(types), 3), dtype=np.int64)
    for i, (g, p) in enumerate(zip(gold_tags, predicted_tags, strict=True)):
        true, pred = set(get_entities(list(g))), set(get_entities(list(p)))
        for kind, spans in ((0, true & pred), (1, pred - true), (2, true - pred)):
            for entity_type, _, _ in spans:
                counts[i, index[entity_type], kind] += 1
    return counts


def f1_from_counts(counts: np.ndarray, average: str) -> np.ndarray:
    """F1 from (…, K, 3) counts of (TP, FP, FN); a 0/0 is 0, as scikit-learn's ``zero_division=0``.

        macro: (1/K) Σ_k 2TP_k / (2TP_k + FP_k + FN_k)
        micro: 2ΣTP / (2ΣTP + ΣFP + ΣFN)
    """
    counts = np.asarray(counts, dtype=float)
    if average == "micro":
        counts = counts.sum(axis=-2)
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1 if average == "micro" else f1.mean(axis=-1)


def paired_bootstrap_f1_delta(candidate: np.ndarray, baseline: np.ndarray, average: str, samples: int = 2000,
                              seed: int = 0, alpha: float = 0.05) -> dict:
    """F1(candidate) − F1(baseline) on the same examples, with a paired percentile bootstrap interval.

    ``candidate`` and ``baseline`` are (N, K, 3) counts (:func:`label_f1_counts`,
    :func:`entity_f1_counts`) of one example set. Each of B = ``samples`` resamples draws N
    examples with replacement, the *same* draw for both models (paired: the examples that are hard
    for one are hard for the other, so the interval of the difference is much narrower than that of
    two independent F1s), and computes Δ_b = F1_c(b) − F1_b(b); the interval is the (α/2, 1 − α/2)
    quantiles of Δ_b (Efron & Tibshirani 1993, ch. 13; Koehn 2004 for the paired form). F1 is not a
    mean over examples, so each resample recomputes it from summed counts: a draw is a vector of
    multinomial counts w (how often each example was drawn) and the resample's counts are wᵀC.

    Returns ``{delta, lower, upper, samples}``; ``lower > 0`` says the candidate is better at
    level α (one-sided α/2).
    """
    if candidate.shape != baseline.shape or candidate.ndim != 3 or candidate.shape[-1] != 3:
        raise ValueError(f"counts must both be (N, K, 3); got {candidate.shape} and {baseline.shape}")
    n = candidate.shape[0]
    if n == 0:
        raise ValueError("no examples to compare")
    rng = np.random.default_rng(seed)
    flat_c = candidate.reshape(n, -1).astype(float)
    flat_b = baseline.reshape(n, -1).astype(float)
    deltas = []
    for start in range(0, samples, 256):  # chunks: a (B, N) weight matrix for 10k examples is large
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(256, samples - start)).astype(float)
        c = (w @ flat_c).reshape(len(w), *candidate.shape[1:])
        b = (w @ flat_b).reshape(len(w), *baseline.shape[1:])
        deltas.append(f1_from_counts(c, average) - f1_from_counts(b, average))
    delta_b = np.concatenate(deltas)
    delta = float(f1_from_counts(candidate.sum(axis=0), average) - f1_from_counts(baseline.sum(axis=0), average))
    lower, upper = np.quantile(delta_b, [alpha / 2, 1 - alpha / 2])
    return {"delta": delta, "lower": float(lower), "upper": float(upper), "samples": samples}
