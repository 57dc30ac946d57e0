"""Is the reward model trained well? Accuracy, calibration and length bias on scored preference pairs.

The caller scores each held-out pair with the reward model (``r_c`` for the chosen response, ``r_r``
for the rejected one) and passes the scores and the response lengths here; nothing in this module
needs torch or a model, so every number is checkable on a handful of hand-written pairs. The reward
stage writes this report at its end; ``alignloop reward-report`` writes it for a saved model.

``pair_quality`` turns the scores into one JSON-serialisable dict; ``write_reward_report`` writes
that dict as ``metrics.json`` beside ``report.md`` and its plots.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignloop.report.markdown import markdown_images, md_cell, md_table, number_cell
from alignloop.report.plots import plot_length_vs_reward, plot_per_group, plot_reliability, plot_scores
from alignloop.report.stats import (
    LENGTH_CORR_WARN,
    brier_of_margins,
    finite_1d,
    log_loss_of_margins,
    pearson,
    reliability_bins,
    sigmoid,
    spearman,
    wilson_interval,
)

WELL_CALIBRATED_ECE = 0.05  # below this the reliability diagram is within a few points of the diagonal
SHORTER_GAP_WARN = 0.1  # accuracy when the chosen is shorter may trail overall by this much before we warn


def pair_outcomes(margins: np.ndarray) -> np.ndarray:
    """Per pair: 1 if r_c > r_r, 0 if r_c < r_r, ½ on a tie (the model has no preference: a coin flip)."""
    return (margins > 0) + 0.5 * (margins == 0)


def _accuracy_block(outcomes: np.ndarray) -> dict:
    """``pairs``, ``accuracy`` and its Wilson ``accuracy_ci`` for a set of pair outcomes."""
    n = len(outcomes)
    ci = wilson_interval(float(np.sum(outcomes)), n)
    return {"pairs": n, "accuracy": float(np.mean(outcomes)), "accuracy_ci": ci}


def _as_arrays(chosen, rejected, chosen_len, rejected_len) -> tuple[np.ndarray, ...]:
    """Non-empty 1-D float arrays of finite values, all one length; the error names the offending input."""
    named = {"chosen": chosen, "rejected": rejected, "chosen_len": chosen_len, "rejected_len": rejected_len}
    arrays = {name: finite_1d(values, name) for name, values in named.items()}
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"chosen, rejected, chosen_len and rejected_len must be the same length, got {sizes}")
    return tuple(arrays.values())


def pair_quality(
    chosen: Sequence[float],
    rejected: Sequence[float],
    chosen_len: Sequence[int],
    rejected_len: Sequence[int],
    groups: Sequence[str] | None = None,
    bins: int = 10,
) -> dict:
    """How well a reward model's scores rank, and how honest their implied probabilities are, on N pairs.

    With margin m_i = r_c,i − r_r,i (chosen minus rejected score) for pair i:

    Ranking
        accuracy  = (1/N) Σ_i [m_i > 0] + ½[m_i = 0]      a tie is half right: no preference is a coin flip
        accuracy_ci: 95% Wilson interval of accuracy (ties count as half a success)
        margin_mean = (1/N) Σ_i m_i;  chosen/rejected/margin mean and std (population, ddof=0)

    Calibration of the Bradley–Terry probability p_i = σ(m_i) that the chosen wins
        The predicted winner has confidence c_i = max(p_i, 1 − p_i) = σ(|m_i|) and is correct
        (y_i = 1) when m_i > 0, wrong (0) when m_i < 0, half right at m_i = 0 (c_i = 0.5).
        Confidences fall in ``bins`` equal-width bins over [0.5, 1.0]; bin b holds n_b pairs with
        mean confidence conf_b and accuracy acc_b = mean y_i:
        ece       = Σ_b (n_b / N) · |acc_b − conf_b|
        mean_confidence = (1/N) Σ_i c_i   > accuracy: over-confident (margins too large)
        brier     = (1/N) Σ_i (1 − p_i)²      the chosen always won, so the outcome is 1
        log_loss  = (1/N) Σ_i −log σ(m_i) = (1/N) Σ_i log(1 + e^{−m_i})  (the RM's own training loss)

    Length bias (ℓ = response length, in whatever unit the caller counts)
        length_reward_corr / length_reward_spearman: Pearson / Spearman of r against ℓ over all 2N
            responses, chosen and rejected pooled
        length_margin_corr: Pearson of m_i against ℓ_c,i − ℓ_r,i
        accuracy_chosen_shorter (+ pairs_chosen_shorter): accuracy where ℓ_c < ℓ_r; likewise
            accuracy_chosen_longer for ℓ_c > ℓ_r; None when there are no such pairs
        longer_wins_baseline = (1/N) Σ_i [ℓ_c > ℓ_r] + ½[ℓ_c = ℓ_r]: the accuracy of "pick the
            longer response", the heuristic a length-biased RM collapses to
        Correlations are None (not NaN, for JSON) when an input is constant.

    ``groups`` (one label per pair, e.g. the data source) adds ``per_group``:
    ``{group: {pairs, accuracy, accuracy_ci}}`` sorted by name.

    Every value is a plain Python int, float, None, str, list or dict, so ``json.dumps`` round-trips it.
    """
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    r_c, r_r, len_c, len_r = _as_arrays(chosen, rejected, chosen_len, rejected_len)
    n = len(r_c)
    margins = r_c - r_r
    correct = pair_outcomes(margins)
    confidence = sigmoid(np.abs(margins))  # = max(p, 1 − p), without the rounding of 1 − p near p ≈ 1
    shorter, longer = len_c < len_r, len_c > len_r
    rewards, lengths = np.concatenate([r_c, r_r]), np.concatenate([len_c, len_r])

    quality = {
        **_accuracy_block(correct),
        "ties": int(np.sum(margins == 0)),
        "margin_mean": float(np.mean(margins)),
        "margin_std": float(np.std(margins)),
        "chosen_mean": float(np.mean(r_c)),
        "chosen_std": float(np.std(r_c)),
        "rejected_mean": float(np.mean(r_r)),
        "rejected_std": float(np.std(r_r)),
    }
    reliability = reliability_bins(confidence, correct, bins)
    quality["ece"] = float(sum(
        b["count"] / n * abs(b["accuracy"] - b["mean_confidence"]) for b in reliability if b["count"]
    ))
    quality["mean_confidence"] = float(np.mean(confidence))
    quality["brier"] = brier_of_margins(margins)
    quality["log_loss"] = log_loss_of_margins(margins)
    quality["reliability"] = reliability
    quality["length_reward_corr"] = pearson(lengths, rewards)
    quality["length_reward_spearman"] = spearman(lengths, rewards)
    quality["length_margin_corr"] = pearson(len_c - len_r, margins)
    quality["pairs_chosen_shorter"] = int(np.sum(shorter))
    quality["accuracy_chosen_shorter"] = float(np.mean(correct[shorter])) if shorter.any() else None
    quality["pairs_chosen_longer"] = int(np.sum(longer))
    quality["accuracy_chosen_longer"] = float(np.mean(correct[longer])) if longer.any() else None
    quality["longer_wins_baseline"] = float(np.mean(longer + 0.5 * (len_c == len_r)))

    if groups is not None:
        labels = [str(g) for g in groups]
        if len(labels) != n:
            raise ValueError(f"groups has {len(labels)} labels for {n} pairs; give one label per pair")
        label_array = np.asarray(labels, dtype=object)
        quality["per_group"] = {g: _accuracy_block(correct[label_array == g]) for g in sorted(set(labels))}
    return quality


# ---- report: metrics.json, plots and report.md -------------------------------------------------------------

TABLE = (  # (key, what it means) in the order a reader checks them
    ("pairs", "preference pairs scored"),
    ("accuracy", "fraction with r_chosen > r_rejected (ties ½)"),
    ("accuracy_ci", "95% Wilson interval of accuracy"),
    ("ties", "pairs with equal scores"),
    ("margin_mean", "mean r_chosen − r_rejected"),
    ("margin_std", "std of the margin"),
    ("chosen_mean", "mean chosen score"),
    ("chosen_std", "std of chosen scores"),
    ("rejected_mean", "mean rejected score"),
    ("rejected_std", "std of rejected scores"),
    ("ece", "expected calibration error of σ(margin)"),
    ("mean_confidence", "mean max(p, 1 − p); above accuracy = over-confident"),
    ("brier", "mean (1 − σ(margin))²"),
    ("log_loss", "mean −log σ(margin) (the RM training loss)"),
    ("length_reward_corr", "Pearson(length, reward), 2N responses"),
    ("length_reward_spearman", "Spearman(length, reward), 2N responses"),
    ("length_margin_corr", "Pearson(length difference, margin)"),
    ("accuracy_chosen_shorter", "accuracy where the chosen is shorter"),
    ("pairs_chosen_shorter", "pairs where the chosen is shorter"),
    ("accuracy_chosen_longer", "accuracy where the chosen is longer"),
    ("pairs_chosen_longer", "pairs where the chosen is longer"),
    ("longer_wins_baseline", "accuracy of “pick the longer response”"),
)


def reward_verdict(quality: dict) -> str:
    """One plain-English paragraph judged from the numbers: ranking, calibration, length bias."""
    acc, (lo, hi), n = quality["accuracy"], quality["accuracy_ci"], quality["pairs"]
    baseline = quality["longer_wins_baseline"]
    ranking = f"Accuracy {acc:.2f} [{lo:.2f}, {hi:.2f}] on {n:,} pairs"
    if quality["ties"]:
        ranking += f" ({quality['ties']:,} tied, counted as half correct)"
    if lo <= 0.5:
        ranking += ": not distinguishable from chance (0.5)"
    elif lo > baseline:
        ranking += f"; it beats the “longer wins” heuristic ({baseline:.2f})"
    else:
        ranking += f"; it does not clearly beat the “longer wins” heuristic ({baseline:.2f})"
    sentences = [ranking + "."]

    ece, confidence = quality["ece"], quality["mean_confidence"]
    if ece < WELL_CALIBRATED_ECE:
        sentences.append(f"The Bradley–Terry probabilities σ(margin) are well calibrated (ECE {ece:.3f}).")
    elif confidence > acc:
        sentences.append(
            f"The model is over-confident (ECE {ece:.3f}: mean confidence {confidence:.2f} against accuracy "
            f"{acc:.2f}): its margins are too large, and dividing the scores by a temperature above 1 would "
            "calibrate them."
        )
    else:
        sentences.append(
            f"The model is under-confident (ECE {ece:.3f}: mean confidence {confidence:.2f} against accuracy "
            f"{acc:.2f}): its margins are too small for how often it is right (a temperature below 1 would "
            "calibrate them)."
        )

    warnings = []
    corr = quality["length_reward_corr"]
    if corr is not None and abs(corr) > LENGTH_CORR_WARN:
        warnings.append(f"reward correlates with response length (Pearson {corr:+.2f})")
    shorter = quality["accuracy_chosen_shorter"]
    if shorter is not None and shorter < acc - SHORTER_GAP_WARN:
        warnings.append(
            f"accuracy drops to {shorter:.2f} on the {quality['pairs_chosen_shorter']:,} pairs whose chosen "
            "response is the shorter one"
        )
    if warnings:
        # a chosen-shorter accuracy gap alone means longer is favoured; a negative correlation, shorter
        favoured = "shorter" if corr is not None and corr < -LENGTH_CORR_WARN else "longer"
        sentences.append(
            "Length bias: " + "; ".join(warnings) + f". A policy trained on this reward is likely to learn "
            f"to write {favoured}, not better."
        )
    else:
        sentences.append(
            f"No sign of length bias (Pearson(length, reward) {number_cell(corr, '.2f')}; accuracy {number_cell(shorter, '.2f')} "
            "when the chosen response is the shorter one)."
        )
    return " ".join(sentences)


def write_reward_report(
    folder: Path,
    quality: dict,
    chosen: Sequence[float],
    rejected: Sequence[float],
    chosen_len: Sequence[int],
    rejected_len: Sequence[int],
    title: str,
    notes: str = "",
) -> Path:
    """``metrics.json``, the plots and ``report.md`` (verdict, metrics table, images) in ``folder``.

    ``quality`` is :func:`pair_quality` of the same scores; the raw scores and lengths are only
    for the plots. ``per_group.png`` is written only when ``quality`` has ``per_group``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    r_c, r_r, len_c, len_r = _as_arrays(chosen, rejected, chosen_len, rejected_len)
    (folder / "metrics.json").write_text(json.dumps(quality, indent=2) + "\n")
    length_note = (f"pooled Pearson {number_cell(quality['length_reward_corr'], '.2f')}, "
                   f"Spearman {number_cell(quality['length_reward_spearman'], '.2f')}")
    plots = {
        "reliability diagram": plot_reliability(quality, folder / "reliability.png", title),
        "score and margin histograms": plot_scores(r_c, r_r, folder / "scores.png", title),
        "length vs reward": plot_length_vs_reward({"chosen": (len_c, r_c), "rejected": (len_r, r_r)},
                                                  folder / "length_vs_reward.png", title,
                                                  xlabel="response length", note=length_note),
    }
    group_rows = []
    if "per_group" in quality:
        plots["accuracy per group"] = plot_per_group(quality, folder / "per_group.png", title)
        group_rows = [
            *md_table(("group", "pairs", "accuracy", "95% CI"),
                      ((md_cell(g), f"{b['pairs']:,}", f"{b['accuracy']:.3f}", number_cell(b["accuracy_ci"], ".3f"))
                       for g, b in quality["per_group"].items())),
            "",
        ]
    text = "\n".join([
        f"# {title}: reward model quality",
        "",
        reward_verdict(quality),
        "",
        *md_table(("metric", "value", "meaning"),
                  ((f"`{key}`", number_cell(quality[key], ".3f"), meaning) for key, meaning in TABLE)),
        "",
        *group_rows,
        *markdown_images(folder, plots),
        "Every number, with the reliability bins: `metrics.json`.",
        "",
        notes,
    ])
    out = folder / "report.md"
    out.write_text(text.rstrip() + "\n")
    return out
