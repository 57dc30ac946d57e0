"""Is the reward model trained well? Accuracy, calibration and length bias on scored preference pairs.

The caller scores each held-out pair with the reward model (``r_c`` for the chosen response, ``r_r``
for the rejected one) and passes the scores and the response lengths here; nothing in this module
needs torch or a model, so every number is checkable on a handful of hand-written pairs.

``pair_quality`` turns the scores into one JSON-serialisable dict; ``write_reward_report`` writes
that dict as ``metrics.json`` beside ``report.md`` and its plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile, Φ⁻¹(0.975)
WELL_CALIBRATED_ECE = 0.05  # below this the reliability diagram is within a few points of the diagonal
LENGTH_CORR_WARN = 0.3  # |Pearson(length, reward)| above this: length explains a visible share of the score
SHORTER_GAP_WARN = 0.1  # accuracy when the chosen is shorter may trail overall by this much before we warn


def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) = 1 / (1 + e^{−x}) as exp(−softplus(−x)): no overflow warning for large |x|."""
    return np.exp(-np.logaddexp(0.0, -x))


def wilson_interval(successes: float, n: int, z: float = Z_95) -> list[float]:
    """Wilson score interval for a proportion p̂ = successes / n.

        centre = (p̂ + z²/2n) / (1 + z²/n)
        half   = z / (1 + z²/n) · √(p̂(1 − p̂)/n + z²/4n²)

    Unlike the normal interval p̂ ± z√(p̂(1−p̂)/n) it stays inside [0, 1] and does not collapse to a
    point at p̂ = 0 or 1. ``successes`` may be fractional (a tie counts as half a success).
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


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson r = Σ(x−x̄)(y−ȳ) / √(Σ(x−x̄)² · Σ(y−ȳ)²); None when either input is constant.

    None rather than NaN: the value goes to JSON, and np.corrcoef would also warn (warnings are
    errors in our tests).
    """
    xc = np.asarray(x, dtype=float) - np.mean(x)
    yc = np.asarray(y, dtype=float) - np.mean(y)
    denom = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    if denom == 0.0:
        return None
    return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of the ranks they span ([5, 7, 7] → [1, 2.5, 2.5])."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first index of each run of equal values
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks starts+1 .. ends
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman ρ: Pearson r of the average ranks, so ties are handled; None when either input is constant.

    Numpy, not scipy: scipy is not a dependency of alignloop.
    """
    return pearson(average_ranks(x), average_ranks(y))


def pair_outcomes(margins: np.ndarray) -> np.ndarray:
    """Per pair: 1 if r_c > r_r, 0 if r_c < r_r, ½ on a tie (the model has no preference: a coin flip)."""
    return (margins > 0) + 0.5 * (margins == 0)


def _accuracy_block(outcomes: np.ndarray) -> dict:
    """``pairs``, ``accuracy`` and its Wilson ``accuracy_ci`` for a set of pair outcomes."""
    n = len(outcomes)
    ci = wilson_interval(float(np.sum(outcomes)), n)
    return {"pairs": n, "accuracy": float(np.mean(outcomes)), "accuracy_ci": ci}


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int) -> list[dict]:
    """Equal-width bins over [0.5, 1.0] of the predicted winner's confidence.

    Bin b covers [lo_b, hi_b) (the last bin also holds 1.0). Each bin reports its ``count`` n_b,
    ``mean_confidence`` conf_b and ``accuracy`` acc_b (mean of ``correct``); empty bins keep their
    place with count 0 and None for both means, so bin i is always ``[i]``.
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


def _as_arrays(chosen, rejected, chosen_len, rejected_len) -> tuple[np.ndarray, ...]:
    """Float arrays of equal, non-zero length with finite scores; the error names the offending input."""
    arrays = {
        "chosen": np.asarray(chosen, dtype=float),
        "rejected": np.asarray(rejected, dtype=float),
        "chosen_len": np.asarray(chosen_len, dtype=float),
        "rejected_len": np.asarray(rejected_len, dtype=float),
    }
    sizes = {name: a.shape for name, a in arrays.items()}
    if len(set(sizes.values())) != 1 or arrays["chosen"].ndim != 1:
        raise ValueError(f"chosen, rejected, chosen_len and rejected_len must be 1-D and the same length, got {sizes}")
    if len(arrays["chosen"]) == 0:
        raise ValueError("no pairs to evaluate: the score lists are empty")
    for name, a in arrays.items():
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} has {int(np.sum(~np.isfinite(a)))} non-finite value(s) (NaN or inf)")
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
    quality["brier"] = float(np.mean(sigmoid(-margins) ** 2))  # 1 − σ(m) = σ(−m), exact for large m
    quality["log_loss"] = float(np.mean(np.logaddexp(0.0, -margins)))  # −log σ(m) = softplus(−m)
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


def _fmt(value, digits: int = 3) -> str:
    """A metric as a table cell: ints with thousands separators, floats rounded, [lo, hi] for intervals."""
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return f"{value:.{digits}f}"


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
            f"No sign of length bias (Pearson(length, reward) {_fmt(corr, 2)}; accuracy {_fmt(shorter, 2)} "
            "when the chosen response is the shorter one)."
        )
    return " ".join(sentences)


def plot_reliability(quality: dict, out: Path, title: str) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, bin counts below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in quality["reliability"] if b["count"]]
    fig, (ax, ax_count) = plt.subplots(
        2, 1, figsize=(5.6, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0.5, 1.0], [0.5, 1.0], ls="--", color="tab:gray", label="perfect calibration")
    ax.bar(
        [b["lo"] for b in bins], [b["accuracy"] for b in bins], width=[b["hi"] - b["lo"] for b in bins],
        align="edge", alpha=0.35, edgecolor="tab:blue", color="tab:blue", label="accuracy per bin",
    )
    ax.plot(
        [b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="tab:blue",
        label="(mean confidence, accuracy)",
    )
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("accuracy of the predicted winner")
    ax.set_title(f"{title}: reliability (ECE {quality['ece']:.3f})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax_count.bar(
        [b["lo"] for b in bins], [b["count"] for b in bins], width=[b["hi"] - b["lo"] for b in bins],
        align="edge", color="tab:gray", edgecolor="white",
    )
    ax_count.set_xlabel("confidence max(σ(m), 1 − σ(m)), m = r_chosen − r_rejected")
    ax_count.set_ylabel("pairs")
    ax_count.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_scores(chosen: np.ndarray, rejected: np.ndarray, out: Path, title: str) -> Path:
    """Histograms of chosen and rejected scores (overlaid, shared bins) and of the margin, line at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    margins = chosen - rejected
    fig, (ax_scores, ax_margin) = plt.subplots(1, 2, figsize=(10, 3.6))
    edges = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=40)  # shared, so heights compare
    ax_scores.hist(chosen, bins=edges, alpha=0.5, color="tab:green", label=f"chosen (mean {np.mean(chosen):.2f})")
    ax_scores.hist(rejected, bins=edges, alpha=0.5, color="tab:red", label=f"rejected (mean {np.mean(rejected):.2f})")
    ax_scores.set_xlabel("reward")
    ax_scores.set_ylabel("responses")
    ax_scores.set_title(f"{title}: scores")
    ax_scores.grid(alpha=0.3)
    ax_scores.legend(fontsize=8)
    ax_margin.hist(margins, bins=40, color="tab:blue", alpha=0.7)
    ax_margin.axvline(0.0, color="black", lw=1, label="0: no preference")
    ax_margin.axvline(float(np.mean(margins)), color="tab:orange", ls="--", label=f"mean {np.mean(margins):.2f}")
    ax_margin.set_xlabel("margin r_chosen − r_rejected (right of 0 = correct)")
    ax_margin.set_ylabel("pairs")
    ax_margin.set_title("margins")
    ax_margin.grid(alpha=0.3)
    ax_margin.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_length_vs_reward(
    quality: dict, chosen: np.ndarray, rejected: np.ndarray, chosen_len: np.ndarray, rejected_len: np.ndarray,
    out: Path, title: str,
) -> Path:
    """Scatter of response length against reward, chosen and rejected in two colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alpha = float(np.clip(300 / len(chosen), 0.08, 0.8))  # many points: fainter, so density shows
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(chosen_len, chosen, s=8, alpha=alpha, color="tab:green", label="chosen")
    ax.scatter(rejected_len, rejected, s=8, alpha=alpha, color="tab:red", label="rejected")
    ax.set_xlabel("response length")
    ax.set_ylabel("reward")
    ax.set_title(
        f"{title}: length vs reward\nPearson {_fmt(quality['length_reward_corr'], 2)}, "
        f"Spearman {_fmt(quality['length_reward_spearman'], 2)}"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_per_group(quality: dict, out: Path, title: str) -> Path:
    """Horizontal bars of per-group accuracy with Wilson whiskers, lines at overall accuracy and 0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(quality["per_group"])
    blocks = [quality["per_group"][g] for g in names]
    acc = np.array([b["accuracy"] for b in blocks])
    ci = np.array([b["accuracy_ci"] for b in blocks])
    height = 1.8 + 0.35 * len(names)  # inches: title, axis and legend, then one row per group
    fig, ax = plt.subplots(figsize=(6.4, height))
    y = np.arange(len(names))
    ax.barh(y, acc, xerr=[acc - ci[:, 0], ci[:, 1] - acc], color="tab:blue", alpha=0.6, capsize=3,
            label="accuracy (95% CI)")
    ax.axvline(quality["accuracy"], color="tab:orange", ls="--", label=f"overall {quality['accuracy']:.2f}")
    ax.axvline(0.5, color="black", lw=1, label="chance 0.5")
    ax.set_yticks(y, [f"{g} (n={b['pairs']:,})" for g, b in zip(names, blocks)])
    ax.invert_yaxis()  # first group (alphabetically) on top, as it reads in the table
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("accuracy")
    ax.set_title(f"{title}: accuracy per group")
    ax.grid(alpha=0.3, axis="x")
    fig.legend(fontsize=8, loc="lower center", ncol=3)  # under the axes: bars may reach any x
    fig.tight_layout(rect=(0.0, 0.35 / height, 1.0, 1.0))  # keep 0.35 in at the bottom for the legend
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
    images = [
        ("reliability diagram", plot_reliability(quality, folder / "reliability.png", title)),
        ("score and margin histograms", plot_scores(r_c, r_r, folder / "scores.png", title)),
        ("length vs reward", plot_length_vs_reward(quality, r_c, r_r, len_c, len_r, folder / "length_vs_reward.png",
                                                   title)),
    ]
    group_rows = []
    if "per_group" in quality:
        images.append(("accuracy per group", plot_per_group(quality, folder / "per_group.png", title)))
        group_rows = [
            "| group | pairs | accuracy | 95% CI |",
            "| --- | --- | --- | --- |",
            *(f"| {g} | {b['pairs']:,} | {b['accuracy']:.3f} | {_fmt(b['accuracy_ci'])} |"
              for g, b in quality["per_group"].items()),
            "",
        ]
    text = "\n".join([
        f"# {title}: reward model quality",
        "",
        reward_verdict(quality),
        "",
        "| metric | value | meaning |",
        "| --- | --- | --- |",
        *(f"| `{key}` | {_fmt(quality[key])} | {meaning} |" for key, meaning in TABLE),
        "",
        *group_rows,
        *(f"![{alt}]({path.name})\n" for alt, path in images),
        "Every number, with the reliability bins: `metrics.json`.",
        "",
        notes,
    ])
    out = folder / "report.md"
    out.write_text(text.rstrip() + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# A saved reward model on a preference file: `alignloop reward-report`
# ---------------------------------------------------------------------------------------------
def report_reward_model(model_path: str, data_path: str, out: Path, batch_size: int = 32,
                        max_length: int | None = None, max_samples: int | None = None) -> Path:
    """Score every pair of ``data_path`` (any format :func:`load_records` reads) with the reward
    model at ``model_path`` and write the quality report to ``out``; return ``out/report.md``."""
    from alignloop.data.load import load_records
    from alignloop.models.reward import RewardScorer
    from alignloop.rollout.rewards import completion_text

    rows, _ = load_records(data_path, ("preference",), max_samples)
    scorer = RewardScorer(model_path, batch_size=batch_size, max_length=max_length)
    prompts = [r.fields["prompt"] for r in rows]
    chosen = scorer.score(prompts, [r.fields["chosen"] for r in rows])
    rejected = scorer.score(prompts, [r.fields["rejected"] for r in rows])
    chosen_len = [len(completion_text(r.fields["chosen"])) for r in rows]
    rejected_len = [len(completion_text(r.fields["rejected"])) for r in rows]
    groups = [str(r.fields["group"]) for r in rows] if all(r.fields.get("group") is not None for r in rows) else None
    quality = pair_quality(chosen, rejected, chosen_len, rejected_len, groups)
    out.mkdir(parents=True, exist_ok=True)
    return write_reward_report(out, quality, chosen, rejected, chosen_len, rejected_len,
                               title=f"reward model {model_path} on {data_path}",
                               notes="Lengths are the responses' characters.")
