"""Every figure of every report goes through :func:`figure`; here are the ones train/ and evaluate/ share.

Training curves (``train``), run curves from any ``metrics.jsonl`` (``evaluate --runs``), reward
histograms and length-vs-reward scatters (candidate vs baseline, chosen vs rejected), and the
reward-model quality figures (reliability diagram, score and margin histograms, per-group accuracy).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from alignloop.report.stats import finite_1d, is_number, reward_length_correlation

DPI = 110
COLOURS = {"baseline": "tab:gray", "candidate": "tab:blue", "chosen": "tab:green", "rejected": "tab:red"}


@functools.cache
def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, chosen once. Imported on first use, so commands that draw
    nothing (serve, --help) never load matplotlib; Agg because reports are files and servers have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def figure(out: Path, *grid: int, rect: tuple[float, float, float, float] | None = None,
           **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``with figure(out, 1, 2, figsize=...) as (fig, axes):`` a new figure from ``plt.subplots``; on
    leaving the block it is laid out (``rect``: the share of the figure the axes fill, to leave room
    for a figure legend), saved to ``out`` at ``DPI`` and closed, also when drawing fails, so a
    long run leaks no figures."""
    plt = pyplot()
    fig, axes = plt.subplots(*grid, **subplots)
    try:
        yield fig, axes
        fig.tight_layout(rect=rect)
        fig.savefig(out, dpi=DPI)
    finally:
        plt.close(fig)


def _overlaid_histograms(ax: Any, series: dict[str, np.ndarray]) -> None:
    """One histogram per named series on shared bins (so heights compare), each mean a dashed line."""
    edges = np.histogram_bin_edges(np.concatenate(list(series.values())), bins=40)
    for name, scores in series.items():
        mean = float(np.mean(scores))
        ax.hist(scores, bins=edges, alpha=0.5, color=COLOURS[name], label=f"{name} (n={len(scores):,})")
        ax.axvline(mean, color=COLOURS[name], ls="--", lw=1.5, label=f"{name} mean {mean:.3g}")
    ax.set_xlabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


# ---- training and run curves ------------------------------------------------------------------------------

CURVES = (("train/loss", "train loss"), ("eval/loss", "held-out loss"))


def plot_training_curves(metrics: list[dict], out: Path, title: str, curves: tuple = CURVES,
                         ylabel: str = "cross-entropy (nats/token)") -> Path:
    """Loss (train and held-out) and learning rate against step, in one PNG."""
    with figure(out, 1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1]}) as (fig, (ax_loss, ax_lr)):
        for key, label in curves:
            points = [(m["step"], m[key]) for m in metrics if key in m]
            if points:
                steps, values = zip(*points)
                ax_loss.plot(steps, values, marker="o" if key.startswith("eval") else None, label=label)
        ax_loss.set_xlabel("optimizer step")
        ax_loss.set_ylabel(ylabel)
        ax_loss.set_title(f"{title}: loss")
        ax_loss.grid(alpha=0.3)
        ax_loss.legend()
        lr = [(m["step"], m["train/lr"]) for m in metrics if "train/lr" in m]
        if lr:
            ax_lr.plot(*zip(*lr), color="tab:gray")
        ax_lr.set_xlabel("optimizer step")
        ax_lr.set_title("learning rate")
        ax_lr.grid(alpha=0.3)
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
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name, _, _ in FAMILIES}
    for i, row in enumerate(metrics_rows):
        step = row.get("step", i)
        for key, value in row.items():
            if key == "step" or not is_number(value) or not math.isfinite(value):
                continue
            family = next((name for name, _, belongs in FAMILIES if belongs(key)), None)
            if family is not None:
                panels[family].setdefault(key, []).append((step, value))
    shown = [(name, ylabel) for name, ylabel, _ in FAMILIES if panels[name]][::-1]  # loss, reward, KL
    columns = max(len(shown), 1)
    with figure(out, 1, columns, figsize=(4.6 * columns, 3.6), squeeze=False) as (fig, axes):
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
    return Path(out)


# ---- rewards and lengths ------------------------------------------------------------------------------------

def plot_reward_distributions(candidate: Sequence[float], baseline: Sequence[float], out: Path,
                              title: str = "candidate vs baseline") -> Path:
    """Overlaid histograms of both models' rewards on shared bins, each mean a dashed line."""
    series = {"baseline": finite_1d(baseline, "baseline"), "candidate": finite_1d(candidate, "candidate")}
    with figure(out, figsize=(6.4, 4.0)) as (fig, ax):
        _overlaid_histograms(ax, series)
        ax.set_ylabel("completions")
        ax.set_title(f"{title}: reward distributions")
    return Path(out)


def plot_length_vs_reward(series: dict[str, tuple[Sequence[float], Sequence[float]]], out: Path, title: str,
                          xlabel: str = "completion length (tokens)", note: str = "") -> Path:
    """Scatter of length against reward, one colour per named series ``{name: (lengths, rewards)}``
    (``baseline``/``candidate`` or ``chosen``/``rejected``); the legend gives each Pearson r, ``note``
    a second title line."""
    with figure(out, figsize=(6.4, 4.4)) as (fig, ax):
        for name, (lengths, rewards) in series.items():
            corr = reward_length_correlation(rewards, lengths)["pearson"]
            alpha = float(np.clip(300 / max(len(rewards), 1), 0.08, 0.8))  # many points: fainter, so density shows
            ax.scatter(lengths, rewards, s=8, alpha=alpha, color=COLOURS[name],
                       label=f"{name} (Pearson {'n/a' if corr is None else f'{corr:+.2f}'})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("reward")
        ax.set_title(f"{title}: length vs reward" + (f"\n{note}" if note else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return Path(out)


# ---- reward-model quality -----------------------------------------------------------------------------------

def plot_reliability(quality: dict, out: Path, title: str) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, bin counts below."""
    bins = [b for b in quality["reliability"] if b["count"]]
    lefts, widths = [b["lo"] for b in bins], [b["hi"] - b["lo"] for b in bins]
    with figure(out, 2, 1, figsize=(5.6, 5.6), sharex=True,
                gridspec_kw={"height_ratios": [3, 1]}) as (fig, (ax, ax_count)):
        ax.plot([0.5, 1.0], [0.5, 1.0], ls="--", color="tab:gray", label="perfect calibration")
        ax.bar(lefts, [b["accuracy"] for b in bins], width=widths, align="edge", alpha=0.35, edgecolor="tab:blue",
               color="tab:blue", label="accuracy per bin")
        ax.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="tab:blue",
                label="(mean confidence, accuracy)")
        ax.set_xlim(0.5, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.set_ylabel("accuracy of the predicted winner")
        ax.set_title(f"{title}: reliability (ECE {quality['ece']:.3f})")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        ax_count.bar(lefts, [b["count"] for b in bins], width=widths, align="edge", color="tab:gray",
                     edgecolor="white")
        ax_count.set_xlabel("confidence max(σ(m), 1 − σ(m)), m = r_chosen − r_rejected")
        ax_count.set_ylabel("pairs")
        ax_count.grid(alpha=0.3)
    return Path(out)


def plot_scores(chosen: np.ndarray, rejected: np.ndarray, out: Path, title: str) -> Path:
    """Histograms of chosen and rejected scores (overlaid, shared bins) and of the margin, line at 0."""
    margins = chosen - rejected
    with figure(out, 1, 2, figsize=(10, 3.6)) as (fig, (ax_scores, ax_margin)):
        _overlaid_histograms(ax_scores, {"chosen": chosen, "rejected": rejected})
        ax_scores.set_ylabel("responses")
        ax_scores.set_title(f"{title}: scores")
        ax_margin.hist(margins, bins=40, color="tab:blue", alpha=0.7)
        ax_margin.axvline(0.0, color="black", lw=1, label="0: no preference")
        ax_margin.axvline(float(np.mean(margins)), color="tab:orange", ls="--", label=f"mean {np.mean(margins):.2f}")
        ax_margin.set_xlabel("margin r_chosen − r_rejected (right of 0 = correct)")
        ax_margin.set_ylabel("pairs")
        ax_margin.set_title("margins")
        ax_margin.grid(alpha=0.3)
        ax_margin.legend(fontsize=8)
    return Path(out)


def plot_per_group(quality: dict, out: Path, title: str) -> Path:
    """Horizontal bars of per-group accuracy with Wilson whiskers, lines at overall accuracy and 0.5."""
    names = list(quality["per_group"])
    blocks = [quality["per_group"][g] for g in names]
    acc = np.array([b["accuracy"] for b in blocks])
    ci = np.array([b["accuracy_ci"] for b in blocks])
    height = 1.8 + 0.35 * len(names)  # inches: title, axis and legend, then one row per group
    # the bottom 0.35 in for the figure legend, under the axes: bars may reach any x
    with figure(out, figsize=(6.4, height), rect=(0.0, 0.35 / height, 1.0, 1.0)) as (fig, ax):
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
        fig.legend(fontsize=8, loc="lower center", ncol=3)
    return Path(out)
