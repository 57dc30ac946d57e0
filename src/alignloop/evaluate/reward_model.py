"""``alignloop reward-report``: a saved reward model's quality (accuracy, calibration, length bias) on a preference file."""

from __future__ import annotations

from pathlib import Path

from alignloop.data.load import load_records
from alignloop.models.reward import RewardScorer
from alignloop.report.reward_quality import pair_quality, write_reward_report
from alignloop.rollout.rewards import completion_text


def report_reward_model(model_path: str, data_path: str, out: Path, batch_size: int = 32,
                        max_length: int | None = None, max_samples: int | None = None) -> Path:
    """Score every pair of ``data_path`` (any format :func:`load_records` reads) with the reward
    model at ``model_path`` and write the quality report to ``out``; return ``out/report.md``."""
    rows, _ = load_records(data_path, ("preference",), max_samples)
    scorer = RewardScorer(model_path, batch_size=batch_size, max_length=max_length)
    prompts = [r.fields["prompt"] for r in rows]
    chosen = scorer.score(prompts, [r.fields["chosen"] for r in rows])
    rejected = scorer.score(prompts, [r.fields["rejected"] for r in rows])
    chosen_len = [len(completion_text(r.fields["chosen"])) for r in rows]
    rejected_len = [len(completion_text(r.fields["rejected"])) for r in rows]
    groups = [str(r.fields["group"]) for r in rows] if all(r.fields.get("group") is not None for r in rows) else None
    quality = pair_quality(chosen, rejected, chosen_len, rejected_len, groups)
    return write_reward_report(out, quality, chosen, rejected, chosen_len, rejected_len,
                               title=f"reward model {model_path} on {data_path}",
                               notes="Lengths are the responses' characters.")
