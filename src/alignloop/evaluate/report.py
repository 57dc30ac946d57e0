"""Training reports: the curves of a run's ``metrics.jsonl`` as a PNG and a short ``report.md``."""

from __future__ import annotations

import math
from pathlib import Path

from alignloop.runs import Run, read_metrics

CURVES = (("train/loss", "train loss"), ("eval/loss", "held-out loss"))


def plot_training_curves(metrics: list[dict], out: Path, title: str, curves: tuple = CURVES,
                         ylabel: str = "cross-entropy (nats/token)") -> Path:
    """Loss (train and held-out) and learning rate against step, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1]})
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
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_training_report(run: Run, title: str, extra: str = "", curves: tuple = CURVES,
                          ylabel: str = "cross-entropy (nats/token)", table: tuple = (("eval/ppl", "held-out perplexity"),)) -> Path:
    """``report.md`` with the loss curves and the first/last numbers of the run."""
    metrics = read_metrics(run.metrics_path)
    plot = plot_training_curves(metrics, run.dir / "loss.png", title, curves, ylabel)
    rows = []
    for key, label in curves + table:
        values = [m[key] for m in metrics if key in m]
        if values:
            rows.append(f"| {label} | {values[0]:.4f} | {values[-1]:.4f} |")
    steps_s = sorted(m["perf/step_s"] for m in metrics if "perf/step_s" in m)
    median_step = steps_s[len(steps_s) // 2] if steps_s else math.nan
    text = "\n".join([
        f"# {title}: {run.dir.name}",
        "",
        f"{metrics[-1]['step'] if metrics else 0} optimizer steps, median {median_step:.3f} s/step. "
        f"Model: `{run.final_dir}`; config: `{run.config_path.name}`; every logged step: `{run.metrics_path.name}`.",
        "",
        "| metric | first logged | last logged |",
        "| --- | --- | --- |",
        *rows,
        "",
        f"![loss curves]({plot.name})",
        "",
        extra,
    ])
    out = run.dir / "report.md"
    out.write_text(text.rstrip() + "\n")
    return out
