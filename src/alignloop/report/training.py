"""Training reports: the curves of a run's ``metrics.jsonl`` as a PNG and a short ``report.md``."""

from __future__ import annotations

import math
from pathlib import Path

from alignloop.report.markdown import md_table
from alignloop.report.plots import CURVES, plot_training_curves
from alignloop.runs import Run, read_metrics


def write_training_report(run: Run, title: str, extra: str = "", curves: tuple = CURVES,
                          ylabel: str = "cross-entropy (nats/token)", table: tuple = (("eval/ppl", "held-out perplexity"),)) -> Path:
    """``report.md`` with the loss curves and the first/last numbers of the run."""
    metrics = read_metrics(run.metrics_path)
    plot = plot_training_curves(metrics, run.dir / "loss.png", title, curves, ylabel)
    rows = []
    for key, label in curves + table:
        values = [m[key] for m in metrics if key in m]
        if values:
            rows.append((label, f"{values[0]:.4f}", f"{values[-1]:.4f}"))
    steps_s = sorted(m["perf/step_s"] for m in metrics if "perf/step_s" in m)
    median_step = steps_s[len(steps_s) // 2] if steps_s else math.nan
    text = "\n".join([
        f"# {title}: {run.dir.name}",
        "",
        f"{metrics[-1]['step'] if metrics else 0} optimizer steps, median {median_step:.3f} s/step. "
        f"Model: `{run.final_dir}`; config: `{run.config_path.name}`; every logged step: `{run.metrics_path.name}`.",
        "",
        *md_table(("metric", "first logged", "last logged"), rows),
        "",
        f"![loss curves]({plot.name})",
        "",
        extra,
    ])
    out = run.dir / "report.md"
    out.write_text(text.rstrip() + "\n")
    return out
