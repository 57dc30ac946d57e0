"""Is the candidate better than the baseline? Win rate, reward, KL, length and diversity on the same prompts.

``alignloop evaluate`` generates one completion per held-out prompt from a candidate and a baseline
model, scores both, and passes plain numbers here: per-prompt outcomes, rewards, lengths, texts and
per-token log-probabilities. Nothing here needs a model, so every number is checkable by hand on a
few prompts; the shared statistics (win rate and its interval, correlations, summaries) are
:mod:`alignloop.report.stats`'.

The pieces compose into one flat ``metrics.json`` (:func:`flatten_metrics`), whose keys a gate such
as ``"win_rate_lower>0.5,kl_per_token<0.1"`` names (:mod:`alignloop.evaluate.gates`), and a
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

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from alignloop.losses import KL_ESTIMATORS
from alignloop.report.markdown import markdown_images, md_cell, md_table, number_cell
from alignloop.report.plots import figure
from alignloop.report.stats import (
    LENGTH_CORR_WARN,
    is_number,
    length_stats,
    reward_length_correlation,
    reward_summary,
)

REPETITION_RISE_WARN = 0.1  # candidate completions with a repeated 4-gram this much more often: collapse


# ---- KL between candidate and baseline ------------------------------------------------------------------------

def kl_summary(candidate_logprobs: Sequence[Sequence[float]], baseline_logprobs: Sequence[Sequence[float]]) -> dict:
    """KL(π_c ‖ π_b) estimated from the candidate's own samples, per sequence and per token.

    Each sequence i is a completion y ~ π_c(·|x) of the candidate; ``candidate_logprobs[i][t]`` is
    log π_c(y_t | x, y_<t) and ``baseline_logprobs[i][t]`` the baseline's log-prob of the same token.
    With log-ratio r_t = log π_b(y_t|·) − log π_c(y_t|·), the per-token estimators are
    ``losses.KL_ESTIMATORS`` (Schulman, "Approximating KL Divergence", 2020,
    http://joschu.net/blog/kl-approx.html), summed over each sequence:

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
    log_ratios = []
    for i, (c_seq, b_seq) in enumerate(zip(candidate_logprobs, baseline_logprobs)):
        c, b = torch.as_tensor(c_seq, dtype=torch.float64), torch.as_tensor(b_seq, dtype=torch.float64)
        if c.shape != b.shape or c.ndim != 1:
            raise ValueError(f"sequence {i}: {tuple(c.shape)} candidate log-probs but {tuple(b.shape)} baseline "
                             "log-probs; give one log-prob per completion token from each model")
        for name, a in (("candidate", c), ("baseline", b)):
            if not torch.isfinite(a).all() or (a > 1e-4).any():  # tolerance: a low-precision log_softmax of ~0
                raise ValueError(f"sequence {i}: {name} log-probs must be finite and ≤ 0 (log-probabilities, "
                                 "not logits)")
        log_ratios.append(b - c)
    k1, k3 = (torch.stack([KL_ESTIMATORS[kind](r).sum() for r in log_ratios]) for kind in ("k1", "k3"))  # (N,) each
    tokens = sum(len(r) for r in log_ratios)
    return {
        "kl_mean": float(k1.mean()),
        "kl_std": float(k1.std(correction=0)),
        "kl_per_token": float(k1.sum()) / tokens if tokens else None,
        "kl_k3_mean": float(k3.mean()),
        "kl_k3_per_token": float(k3.sum()) / tokens if tokens else None,
        "kl_sequences": len(log_ratios),
        "kl_tokens": tokens,
    }


# ---- lengths, diversity and rewards --------------------------------------------------------------------------

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
    ``repetition_<n>``, and ``ppl`` as passed (the held-out perplexity ``evaluate.run.perplexity`` measures).
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


# ---- plots ---------------------------------------------------------------------------------------------------

def plot_win_rate(win: dict, out: Path, title: str = "candidate vs baseline") -> Path:
    """One stacked bar of win / tie / loss shares, the win rate and its interval as an error bar, a line at 0.5."""
    n = win["n"]
    with figure(out, figsize=(7.0, 2.6), rect=(0.0, 0.25, 1.0, 1.0)) as (fig, ax):  # the bottom quarter: legend
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
    return Path(out)


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


def _sample_cell(value) -> str:
    """A sample row's cell: numbers as in the metric tables, text escaped, a missing value empty."""
    if value is None:
        return ""
    return number_cell(value) if is_number(value) else md_cell(value)


def _metric_tables(metrics: dict) -> list[str]:
    """A comparison table (``METRIC_TABLE`` order) and a candidate | baseline table, then any other keys."""
    lines = md_table(("metric", "value", "meaning"), ((f"`{key}`", number_cell(metrics[key]), meaning)
                                                      for key, meaning in METRIC_TABLE if key in metrics))
    described = {key for key, _ in METRIC_TABLE if key in metrics}
    present = {k.split("_", 1)[1] for k in metrics if k.startswith(("candidate_", "baseline_"))}
    side_keys = [(key, meaning) for key, meaning in SIDE_TABLE if key in present]
    side_keys += [(key, "") for key in sorted(present - {key for key, _ in SIDE_TABLE})]  # e.g. distinct_3
    if side_keys:
        lines += ["", "Per model (gate on `candidate_<metric>` or `baseline_<metric>`):", "",
                  *md_table(("metric", "candidate", "baseline", "meaning"),
                            ((f"`{key}`", number_cell(metrics.get(f"candidate_{key}")),
                              number_cell(metrics.get(f"baseline_{key}")), meaning) for key, meaning in side_keys))]
        described |= {f"{side}_{key}" for key, _ in side_keys for side in ("candidate", "baseline")}
    others = [k for k in metrics if k not in described]
    if others:
        lines += ["", *md_table(("other metric", "value"), ((f"`{k}`", number_cell(metrics[k])) for k in others))]
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
    (:func:`plot_win_rate` etc.); ``gate_result`` is ``gates.check_gate``'s answer, also written to
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
            *md_table([md_cell(c) for c in columns], ([_sample_cell(row.get(c)) for c in columns] for row in samples)),
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

def _check_order(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the n-gram order must be a positive integer, got {n!r}")
