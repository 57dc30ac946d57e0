"""Training reports: the curves of a run's ``metrics.jsonl`` as a PNG and a short ``report.md``; the
model card (``final/README.md``) of every stage's model."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml

from alignloop.config import STAGES
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


# The transformers class that loads a saved architecture, by the ending of its class name.
AUTO_CLASSES = (("ForCausalLM", "AutoModelForCausalLM"), ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                ("ForTokenClassification", "AutoModelForTokenClassification"))


def write_model_card(run: Run, cfg: Any, stage: str) -> Path:
    """``final/README.md``, the model card TRL writes beside a model: Hugging Face's YAML header
    (base_model, library_name, tags), what the model was trained from and on, its final metrics,
    how to load it with plain transformers, and the resolved training config."""
    metrics = read_metrics(run.metrics_path)
    final: dict[str, float] = {}
    for line in metrics:  # each metric's last logged value (held-out ones are logged only when evaluated)
        final.update({k: v for k, v in line.items() if k.startswith(("train/", "eval/"))})
    steps = metrics[-1]["step"] if metrics else 0
    auto = auto_class(run.final_dir)
    base = cfg.model.name_or_path
    headline = headline_metric(final, STAGES[stage].progress)
    result = f", final {headline} {final[headline]:.4g}" if headline else ""
    header = yaml.safe_dump({"base_model": base, "library_name": "transformers", "tags": ["alignloop", stage]},
                            sort_keys=False, allow_unicode=True)
    text = "\n".join([
        "---", header.rstrip(), "---", "",
        f"# {run.dir.name}", "",
        f"`{base}` trained by alignloop's `{stage}` stage for {steps} optimizer steps{result}.", "",
        "## Data", "",
        *data_sources(cfg), "",
        "## Final metrics", "",
        *(md_table(("metric", "value"), [(k, f"{v:.4g}") for k, v in sorted(final.items())]) if final else ["(none logged)"]), "",
        "## Use it with transformers", "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("{run.final_dir}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{run.final_dir}")',
        "```", "",
        "## Training config", "",
        f"Every setting, defaults included, as `alignloop {stage} --config` reads it back:", "",
        "```yaml",
        yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True).rstrip(),
        "```", "",
    ])
    path = run.final_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def headline_metric(final: dict[str, float], progress: tuple[str, ...]) -> str | None:
    """The number a card leads with: the stage's first progress metric (its loss; RL: its reward),
    held-out where the run measured it."""
    for key in progress:
        held_out = "eval/" + key.removeprefix("train/")
        for name in (held_out, key):
            if name in final:
                return name
    return None


def auto_class(folder: Path) -> str:
    """The ``AutoModelFor…`` class that loads the model saved in ``folder`` (its config's architecture)."""
    config = folder / "config.json"
    architectures = (json.loads(config.read_text()).get("architectures") or []) if config.is_file() else []
    for name in architectures:
        for ending, auto in AUTO_CLASSES:
            if name.endswith(ending):
                return auto
    return "AutoModel"


def data_sources(cfg: Any) -> list[str]:
    """Markdown list items: the config's settings that name a source (files, builtins, reward sources)."""
    found = []
    for section, keys in (("data", ("path", "eval_path")), ("rl", ("reward", "eval_prompts", "ptx_data", "ref_model")),
                          ("preference", ("ref_model",)), ("classify", ("supervised_path",))):
        for key in keys:
            value = getattr(getattr(cfg, section, None), key, None)
            if value:
                found.append(f"- {section}.{key}: `{value}`")
    if not hasattr(cfg, "rl") and not cfg.data.eval_path and cfg.data.eval_fraction > 0:  # RL holds out rl.eval_prompts
        found.append(f"- held out: a seeded {cfg.data.eval_fraction:g} of data.path")
    return found
