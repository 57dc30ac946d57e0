"""Reward models from what people give: preference pairs, ratings or thumbs.

One explicit loop for the three record kinds; only the loss differs:

| records                          | loss (:mod:`alignloop.losses`)                        |
| -------------------------------- | ----------------------------------------------------- |
| prompt, chosen, rejected         | :func:`bradley_terry` (optional margin, ties)          |
| prompt, completion, rating       | :func:`rating_regression` or :func:`ordinal_rating`   |
| prompt, completion, label        | :func:`thumbs_bce`                                     |

Chosen and rejected go through the model together, in batches of similar length
(:class:`ShuffledBatches` with lengths) or, with ``reward.batching=prompt``, pairs of one prompt
packed to share responses; a response that occurs in several pairs of a batch is scored once,
and with a decoder backbone the prompt a pair shares is run once (``train.share_prefixes``).
Rows longer than ``data.max_length`` are truncated by :func:`alignloop.models.reward.fit_window`
and counted, never dropped. At the end the held-out pairs get the reward-model quality report
(accuracy, calibration, length bias).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from alignloop.config import STAGES, RewardConfig
from alignloop.data.batching import ShuffledBatches, split_holdout
from alignloop.data.load import load_records
from alignloop.data.records import Row, identical_pair_problem
from alignloop.errors import DataError
from alignloop.losses import bradley_terry, ordinal_rating, ordinal_thresholds, rating_regression, thumbs_bce
from alignloop.models.load import load_tokenizer
from alignloop.models.prefix import can_share_prefixes, plan_prefixes, shared_prefix_forward
from alignloop.models.reward import (
    Encoded,
    collate_encoded,
    distinct,
    encode_pairs,
    load_reward_model,
    resolve_backbone,
    reward_forward,
    score_encoded,
)
from alignloop.report.training import write_training_report
from alignloop.rollout.rewards import completion_text
from alignloop.runs import Run
from alignloop.train.loop import TrainingSession, open_stage_run
from alignloop.train.sft import resolve_max_length

log = logging.getLogger("alignloop")

REPORT_TABLE = (("train/accuracy", "train accuracy"), ("eval/accuracy", "held-out accuracy"), ("eval/mae", "held-out MAE"))


@dataclass
class RewardExample:
    """One training row, encoded. Preference: ``first`` = chosen, ``second`` = rejected, ``target``
    = margin, ``tie``. Rating/thumbs: ``first`` only; ``target`` = scaled rating, level or label."""

    first: Encoded
    second: Encoded | None
    target: float
    tie: bool = False
    group: str | None = None
    chars: tuple[int, int] = (0, 0)  # characters of the first and second response (length-bias report)
    prompt: str = ""  # the prompt as text, the key of reward.batching=prompt

    @property
    def length(self) -> int:
        return max(len(self.first.input_ids), len(self.second.input_ids) if self.second else 0)


@dataclass
class RewardData:
    kind: str
    examples: list[RewardExample]
    truncated: int = 0
    skipped: int = 0


class OrdinalHead(torch.nn.Module):
    """The K−1 thresholds of the ordinal rating head (see :func:`ordinal_rating`); a module so the
    optimiser and the checkpoint treat them like the model's own weights."""

    def __init__(self, levels: int):
        super().__init__()
        start = torch.full((levels - 1,), 0.5413)  # softplus(0.5413) = 1: thresholds one apart
        start[0] = -(levels - 2) / 2
        self.raw = torch.nn.Parameter(start)


def run_reward(cfg: RewardConfig) -> Run:
    """``alignloop reward``: read and check the records, encode them, train, report."""
    backbone = resolve_backbone(cfg.model)
    tokenizer = load_tokenizer(backbone)
    rows, kind = load_records(cfg.data.path, STAGES["reward"].reads, cfg.data.max_samples)
    held_rows = None
    if cfg.data.eval_path:
        held_rows, held_kind = load_records(cfg.data.eval_path, STAGES["reward"].reads, cfg.data.max_samples)
        if held_kind != kind:
            raise DataError(f"{cfg.data.eval_path}: {held_kind} records, but the training data holds {kind} records")
    model = load_reward_model(backbone, tokenizer, cfg.train.seed, cfg.reward.disable_dropout)
    max_length = resolve_max_length(cfg.data, model)
    train = encode_reward_rows(cfg.data.path, rows, kind, cfg, tokenizer, max_length)
    if held_rows:
        held = encode_reward_rows(cfg.data.eval_path, held_rows, kind, cfg, tokenizer, max_length)
        train_examples, held_examples = train.examples, held.examples
    else:
        train_examples, held_examples = split_holdout(train.examples, cfg.data.eval_fraction, cfg.train.seed)
    model.config.alignloop_reward = {"kind": kind, "max_length": max_length, "text_pairs": cfg.reward.encoder_text_pairs}
    if kind == "rating":
        lo, hi = cfg.reward.rating_scale
        model.config.alignloop_reward.update(rating_scale=[lo, hi], rating_head=cfg.reward.rating_head)
    return fit_reward_model(cfg, model, tokenizer, kind, train_examples, held_examples)


# ---------------------------------------------------------------------------------------------
# Rows → examples
# ---------------------------------------------------------------------------------------------
def encode_reward_rows(path: str, rows: list[Row], kind: str, cfg: RewardConfig, tokenizer: Any, max_length: int) -> RewardData:
    """Check each row as a reward record of ``kind`` and encode it for the backbone."""
    rows, skipped = check_reward_rows(path, rows, kind, cfg)
    prompts = [r.fields["prompt"] for r in rows]
    prompt_keys = [p if isinstance(p, str) else json.dumps(p, sort_keys=True) for p in prompts]
    groups = [str(r.fields["group"]) if r.fields.get("group") is not None else None for r in rows]
    data = RewardData(kind, [], skipped=skipped)
    if kind == "preference":
        pairs = cfg.reward.encoder_text_pairs
        chosen = encode_pairs(tokenizer, prompts, [r.fields["chosen"] for r in rows], max_length, pairs)
        rejected = encode_pairs(tokenizer, prompts, [r.fields["rejected"] for r in rows], max_length, pairs)
        margin_field, tie_field = cfg.reward.margin_field, cfg.reward.tie_field
        for row, c, r, g, key in zip(rows, chosen, rejected, groups, prompt_keys):
            margin = float(row.fields.get(margin_field) or 0.0) if margin_field else 0.0
            tie = bool(row.fields.get(tie_field)) if tie_field else False
            chars = (len(completion_text(row.fields["chosen"])), len(completion_text(row.fields["rejected"])))
            data.examples.append(RewardExample(c, r, margin, tie, g, chars, key))
            data.truncated += int(c.truncated or r.truncated)
    else:
        encoded = encode_pairs(tokenizer, prompts, [r.fields["completion"] for r in rows], max_length, cfg.reward.encoder_text_pairs)
        targets = rating_targets(rows, cfg) if kind == "rating" else [float(r.fields["label"]) for r in rows]
        for e, target, g, key in zip(encoded, targets, groups, prompt_keys):
            data.examples.append(RewardExample(e, None, target, group=g, prompt=key))
            data.truncated += int(e.truncated)
    if data.truncated:
        log.info("%s: %d of %d rows longer than data.max_length=%d were truncated (response kept first, then the end of the prompt)",
                 path, data.truncated, len(rows), max_length)
    return data


def check_reward_rows(path: str, rows: list[Row], kind: str, cfg: RewardConfig) -> tuple[list[Row], int]:
    """Rows that make sense as ``kind`` reward data; the first bad one raises a DataError naming it,
    or, with ``reward.skip_invalid``, every bad one is counted and left out."""
    kept, problems = [], []
    lo, hi = cfg.reward.rating_scale
    for row in rows:
        f = row.fields
        problem = None
        if kind == "preference" and identical_pair_problem(row):
            problem = identical_pair_problem(row)
        elif kind == "preference" and cfg.reward.margin_field and f.get(cfg.reward.margin_field) is not None:
            if not isinstance(f[cfg.reward.margin_field], (int, float)) or isinstance(f[cfg.reward.margin_field], bool):
                problem = f"{row.where}: field '{cfg.reward.margin_field}' must be a number, got {f[cfg.reward.margin_field]!r}"
        elif kind == "rating" and not lo <= f["rating"] <= hi:
            problem = f"{row.where}: field 'rating' is {f['rating']:g}, outside reward.rating_scale [{lo:g}, {hi:g}]"
        elif kind == "rating" and cfg.reward.rating_head == "ordinal" and not float(f["rating"] - lo).is_integer():
            problem = f"{row.where}: field 'rating' is {f['rating']:g}; the ordinal head needs whole steps from {lo:g} to {hi:g}"
        if problem is None:
            kept.append(row)
        elif not cfg.reward.skip_invalid:
            raise DataError(problem)
        else:
            problems.append(problem)
    if problems:
        log.warning("%s: skipped %d invalid rows (reward.skip_invalid); the first: %s", path, len(problems), problems[0])
    if not kept:
        raise DataError(f"{path}: no valid {kind} rows left")
    return kept, len(problems)


def rating_targets(rows: list[Row], cfg: RewardConfig) -> list[float]:
    """What the rating head learns: the level 1..K (ordinal), a per-user z-score, or the rating
    scaled to [−1, 1]."""
    lo, hi = cfg.reward.rating_scale
    ratings = [float(r.fields["rating"]) for r in rows]
    if cfg.reward.rating_head == "ordinal":
        return [round(x - lo) + 1.0 for x in ratings]
    if cfg.reward.normalize_per_user:
        return per_user_zscores(ratings, [r.fields.get("user") for r in rows])
    return [2 * (x - lo) / (hi - lo) - 1 for x in ratings]


def per_user_zscores(ratings: Sequence[float], users: Sequence[Any]) -> list[float]:
    """Each rating as (rating − user mean) / user std: a harsh rater's 3 and a generous rater's 5
    can mean the same. A user with one rating, or all equal, maps to 0. Rows without a user form
    one pool."""
    by_user: dict[Any, list[int]] = {}
    for i, user in enumerate(users):
        by_user.setdefault(user, []).append(i)
    out = [0.0] * len(ratings)
    for indices in by_user.values():
        values = torch.tensor([ratings[i] for i in indices], dtype=torch.float64)
        std = float(values.std(unbiased=False)) if len(indices) > 1 else 0.0
        for i in indices:
            out[i] = (ratings[i] - float(values.mean())) / std if std > 0 else 0.0
    return out


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def fit_reward_model(cfg: RewardConfig, model: Any, tokenizer: Any, kind: str,
                     train: list[RewardExample], held_out: list[RewardExample]) -> Run:
    cfg, run = open_stage_run(cfg, len(train), "reward")
    if run.is_complete():
        return run
    t = cfg.train
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    head = None
    if kind == "rating" and cfg.reward.rating_head == "ordinal":
        lo, hi = cfg.reward.rating_scale
        head = OrdinalHead(int(round(hi - lo)) + 1)
    last_scores: dict[str, list[float]] = {}  # the held-out scores of the last evaluation, for the report
    with TrainingSession(cfg, model, run, "reward", extra_modules=[head] if head else None) as session:
        model, accelerator = session.model, session.accelerator
        batching, sides = cfg.reward.batching, response_ids(train)
        share_prefixes = t.share_prefixes and can_share_prefixes(model)  # the wrapped model: off under DDP
        batches = ShuffledBatches(len(train), t.batch_size, t.seed, accelerator.process_index, accelerator.num_processes,
                                  lengths=[e.length for e in train] if batching == "length" else None,
                                  groups=[e.prompt for e in train] if batching == "prompt" else None,
                                  sides=sides if batching == "prompt" else None)
        log.info("reward: %d %s rows for training, %d held out; %d steps of %d×%d×%d; run folder %s",
                 len(train), kind, len(held_out), t.max_steps, t.batch_size, t.grad_accum, accelerator.num_processes, run.dir)
        while session.running:
            started = time.perf_counter()
            model.train()
            sums: dict[str, float] = {}
            tokens = rows = distinct_rows = 0
            for k in range(t.grad_accum):
                examples = [train[i] for i in batches.indices(session.step * t.grad_accum + k)]
                batch = collate_examples(examples, pad_id, accelerator.device, cfg.reward.length_groups, share_prefixes)
                tokens += sum(int(inputs["attention_mask"].sum()) for inputs in batch["inputs"])
                rows += len(batch["order"])
                distinct_rows += sum(len(inputs["input_ids"]) for inputs in batch["inputs"])
                last = k == t.grad_accum - 1
                with session.accumulating(last):
                    with session.autocast():
                        rewards = batch_rewards(model, batch)
                    loss, stats = reward_loss(kind, cfg, rewards, batch, head)
                    session.backward(loss / t.grad_accum)
                for name, value in {"loss": float(loss.detach()), **stats}.items():
                    sums[name] = sums.get(name, 0.0) + value / t.grad_accum
            record = session.mean_over_processes({**{f"train/{name}": value for name, value in sums.items()},
                                                  "train/tokens": float(tokens),
                                                  # < 1 when responses repeat within a batch
                                                  "train/distinct_rows": distinct_rows / rows}, summed=("train/tokens",))
            record.update(session.optimizer_step())
            evaluate = (lambda: evaluate_reward(model, kind, cfg, held_out, pad_id, head, last_scores)) if held_out else None
            session.end_step(record, started, evaluate)
        unwrapped = accelerator.unwrap_model(model)
        if head is not None:
            unwrapped.config.alignloop_reward["rating_thresholds"] = ordinal_thresholds(head.raw.detach()).tolist()
        session.save_final(tokenizer)
    if accelerator.is_main_process:
        extra = ""
        if held_out and kind == "preference":
            # The last evaluation scored the final weights, unless it computed in bf16 (saved: fp32).
            cached = last_scores if t.precision == "fp32" else {}
            extra = write_heldout_quality(run, unwrapped, held_out, pad_id, cfg.reward.eval_batch_size, accelerator.device, cached)
        write_training_report(run, "reward", extra=extra, ylabel="loss", table=REPORT_TABLE)
    log.info("reward done: model in %s, report in %s", run.final_dir, run.dir / "report.md")
    return run


def response_ids(examples: Sequence[RewardExample]) -> list[tuple[int, ...]]:
    """Each example's rows as small ints, equal where the model reads the same tokens. Says so
    when rows recur across pairs often enough for ``reward.batching=prompt`` to pay."""
    unique, where = distinct([row for e in examples for row in (e.first, e.second) if row is not None])
    if len(unique) < 0.5 * len(where):
        log.info("reward: %d distinct of %d rows (responses recur across pairs): --reward.batching=prompt scores each once a "
                 "step, several times faster on such data", len(unique), len(where))
    ids = iter(where)
    return [tuple(next(ids) for row in (e.first, e.second) if row is not None) for e in examples]


def collate_examples(examples: Sequence[RewardExample], pad_id: int, device: Any, groups: int = 1,
                     share_prefixes: bool = False) -> dict[str, Any]:
    """One step's batch: for pairs, the B chosen then the B rejected. A row that occurs more than
    once (a response in several pairs of the batch) goes through the model once; its reward is
    shared and its gradient is the sum over its uses, as if it had been scored each time. The
    distinct rows are sorted by length and padded in ``groups`` sub-batches (one forward each), so
    a short row is padded only to the longest row of its own group; ``order`` maps each row of the
    batch to its place among the sorted distinct rows.

    With ``share_prefixes`` (a decoder backbone), rows are sorted by their example's length
    instead, so a pair's two rows share a sub-batch, and each sub-batch carries a plan that runs
    the prompt they share once (:mod:`alignloop.models.prefix`)."""
    items = [e.first for e in examples] + [e.second for e in examples if e.second is not None]
    owner = list(range(len(examples))) + [i for i, e in enumerate(examples) if e.second is not None]
    unique, where = distinct(items)
    share_prefixes = share_prefixes and unique[0].token_type_ids is None
    if share_prefixes:
        first_owner = {}
        for u, i in zip(where, owner):
            first_owner.setdefault(u, i)
        by_length = sorted(range(len(unique)), key=lambda u: (examples[first_owner[u]].length, first_owner[u]))
    else:
        by_length = sorted(range(len(unique)), key=lambda i: len(unique[i].input_ids))
    size = math.ceil(len(unique) / max(1, min(groups, len(unique))))
    sub_batches = []
    for start in range(0, len(unique), size):
        rows = [unique[i] for i in by_length[start : start + size]]
        inputs = {k: v.to(device) for k, v in collate_encoded(rows, pad_id).items()}
        plan = plan_prefixes([r.input_ids for r in rows], [last_real_token(r.input_ids, pad_id) for r in rows], pad_id) \
            if share_prefixes else None
        if plan is not None:
            inputs["plan"] = plan.to(device)
        sub_batches.append(inputs)
    place = {u: rank for rank, u in enumerate(by_length)}
    return {
        "inputs": sub_batches,
        "order": torch.tensor([place[u] for u in where], device=device),
        "target": torch.tensor([e.target for e in examples], dtype=torch.float32, device=device),
        "tie": torch.tensor([e.tie for e in examples], dtype=torch.float32, device=device),
    }


def last_real_token(ids: Sequence[int], pad_id: int) -> int:
    """Where the classifier reads a row: its last token that is not the pad id (transformers' rule
    for decoder classifiers; :func:`alignloop.models.readout.read_positions` is the same rule on a
    padded batch). A shared prefix must stop before it."""
    for k in range(len(ids) - 1, -1, -1):
        if ids[k] != pad_id:
            return k
    return 0


def batch_rewards(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Rewards of a collated batch, in the batch's own row order (a shared row's reward repeated)."""
    sorted_rewards = torch.cat([
        shared_prefix_forward(model, inputs["plan"], causal_lm=False).logits[:, 0].float() if "plan" in inputs
        else reward_forward(model, inputs)
        for inputs in batch["inputs"]
    ])
    return sorted_rewards[batch["order"]]


def reward_loss(kind: str, cfg: RewardConfig, rewards: torch.Tensor, batch: dict[str, Any],
                head: OrdinalHead | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of ``kind`` records on the batch's rewards (see the module table)."""
    if kind == "preference":
        n = len(batch["target"])
        return bradley_terry(rewards[:n], rewards[n:], margin=batch["target"], tie=batch["tie"],
                             center_coef=cfg.reward.center_coef)
    if kind == "binary":
        return thumbs_bce(rewards, batch["target"])
    if head is not None:
        return ordinal_rating(rewards, batch["target"], head.raw)
    return rating_regression(rewards, batch["target"])


@torch.no_grad()
def evaluate_reward(model: Any, kind: str, cfg: RewardConfig, held_out: list[RewardExample], pad_id: int,
                    head: OrdinalHead | None, scores_out: dict[str, list[float]]) -> dict[str, float]:
    """Held-out loss and its kind's headline metric (pair accuracy, rating error, thumbs accuracy).
    The scores are left in ``scores_out`` (``first``, ``second``) for the final report."""
    device = next(model.parameters()).device
    size = cfg.reward.eval_batch_size
    scores_out.clear()
    scores_out["first"] = score_encoded(model, [e.first for e in held_out], pad_id, size, device)
    rewards = torch.tensor(scores_out["first"])
    batch = {"target": torch.tensor([e.target for e in held_out]), "tie": torch.tensor([e.tie for e in held_out], dtype=torch.float32)}
    if kind == "preference":
        scores_out["second"] = score_encoded(model, [e.second for e in held_out], pad_id, size, device)
        rewards = torch.cat([rewards, torch.tensor(scores_out["second"])])
    batch = {k: v.to(device) for k, v in batch.items()}
    loss, stats = reward_loss(kind, cfg, rewards.to(device), batch, head)
    return {"eval/loss": float(loss), **{f"eval/{k}": v for k, v in stats.items() if k in ("accuracy", "mse", "mae", "margin")}}


def write_heldout_quality(run: Run, model: Any, held_out: list[RewardExample], pad_id: int, batch_size: int, device: Any,
                          scores: dict[str, list[float]]) -> str:
    """The quality report of the held-out pairs in ``run/quality/``; a markdown line linking it.
    ``scores`` are the final evaluation's (the model has not changed since); scored anew if absent
    (a resumed run that was already past its last evaluation)."""
    from alignloop.report.reward_quality import pair_quality, write_reward_report

    if "second" in scores:
        chosen, rejected = scores["first"], scores["second"]
    else:
        chosen = score_encoded(model, [e.first for e in held_out], pad_id, batch_size, device)
        rejected = score_encoded(model, [e.second for e in held_out], pad_id, batch_size, device)
    chosen_len = [e.chars[0] for e in held_out]
    rejected_len = [e.chars[1] for e in held_out]
    groups = [e.group for e in held_out] if all(e.group is not None for e in held_out) else None
    quality = pair_quality(chosen, rejected, chosen_len, rejected_len, groups)
    folder = run.dir / "quality"
    folder.mkdir(exist_ok=True)
    write_reward_report(folder, quality, chosen, rejected, chosen_len, rejected_len, title=f"reward model {run.dir.name}: held-out pairs",
                        notes="Lengths are the responses' characters.")
    lo, hi = quality["accuracy_ci"]
    return (f"Held-out pairs: accuracy **{quality['accuracy']:.3f}** [{lo:.3f}, {hi:.3f}] on {quality['pairs']} pairs, "
            f"ECE {quality['ece']:.3f}; the full quality report (calibration, length bias, groups) is in "
            f"[quality/report.md](quality/report.md).")

