"""Offline preference optimisation: DPO (sigmoid, IPO, robust, SimPO; an optional RPO NLL term) on
pairs, KTO on unpaired thumbs. One explicit loop on the shared session.

**Reference log-probs are computed once.** Before training, one no-grad pass of the reference
over the sequences the run will read gives log π_ref(y|x) per sequence: the training rows that
``train.max_steps`` steps draw (every process's batches, :func:`trained_examples`) and every
held-out row. They are saved in the run folder (``ref_logps.pt``, with a fingerprint of the model
and the tokenised data; NaN for rows never read) and reused by every step, every epoch and a
resumed run; a rerun that reads more rows scores only those. The reference is, by default, the starting
policy itself, scored before training touches it, so no second copy of the model is ever held
(with LoRA: the base with the adapter off); ``preference.ref_model`` names another model. In a
bf16 run the pass uses bf16 matmuls as the policy's forwards will. A
training step is then one policy forward and backward over chosen and rejected together (SimPO
needs no reference at all), the prompt they share run once (``train.share_prefixes``,
:mod:`alignloop.models.prefix`).

Over-long sequences: each side is tokenised as prompt + completion + EOS; one longer than
``data.max_length`` keeps the completion's first tokens and the prompt's last ones, the prompt at
least a quarter of the window (the reward models' rule, :func:`fit_example`). Rows are never
dropped; the cut ones are counted in the log.

KTO's reference point z₀ (Ethayarajh et al. 2024) is estimated each step from mismatched
prompt/completion pairs: example i's prompt with example (i+1 mod N)'s completion, a fixed
pairing, so the reference's side of it is computed once too; the policy's side is one no-grad
forward per step.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Sequence

import torch

from alignloop import losses
from alignloop.config import STAGES, DPOConfig, KTOConfig, ModelConfig
from alignloop.data.batching import IGNORE_INDEX, ShuffledBatches, collate, split_holdout, to_device
from alignloop.data.load import load_records
from alignloop.data.records import Row, identical_pair_problem
from alignloop.data.tokenize import Example, tokenize_sft_rows
from alignloop.errors import ConfigError, DataError
from alignloop.models.load import load_causal_lm, load_tokenizer
from alignloop.models.prefix import plan_for, shared_prefix_forward, shared_prompt_order
from alignloop.models.reward import fit_window
from alignloop.runs import Run
from alignloop.train.loop import Precision, TrainingSession, check_reference_tokenizer, open_stage_run, world_size
from alignloop.train.sft import resolve_max_length

log = logging.getLogger("alignloop")

REF_FILE = "ref_logps.pt"


@dataclass
class PreferenceSet:
    """Tokenised sequences and what the loss needs about them.

    Pairs: ``sequences`` is every chosen then every rejected (pair i: i and n + i). Thumbs:
    ``sequences`` is every completion then every mismatched one (example i's prompt with example
    i+1's completion), ``desirable`` the labels.
    """

    sequences: list[Example]
    n: int
    desirable: list[bool] | None = None
    ref: torch.Tensor | None = None  # (len(sequences),) reference log-probs, float64

    def rows(self, idx: Sequence[int]) -> list[int]:
        """Sequence positions of examples ``idx``: theirs, then their partners' (rejected or mismatched)."""
        return [*idx, *(self.n + i for i in idx)]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def pair_set(path: str, rows: list[Row], cfg: Any, tokenizer: Any, max_length: int) -> PreferenceSet:
    """Chosen and rejected of each pair, tokenised; identical sides are an error naming the row."""
    for row in rows:
        problem = identical_pair_problem(row)
        if problem:
            raise DataError(problem)
    sides = [_as_completions(rows, "chosen"), _as_completions(rows, "rejected")]
    return _tokenised(path, rows, sides, cfg, tokenizer, max_length, desirable=None)


def thumbs_set(path: str, rows: list[Row], cfg: Any, tokenizer: Any, max_length: int) -> PreferenceSet:
    """Completions with their thumbs, and the mismatched sequences for KTO's reference point."""
    labels = [bool(r.fields["label"]) for r in rows]
    if all(labels) or not any(labels):
        only = "desirable (true)" if all(labels) else "undesirable (false)"
        raise DataError(f"{path}: every label is {only}; KTO learns from both thumbs up and thumbs down, so it needs some of each")
    own = _as_completions(rows, "completion")
    shifted = [Row({"prompt": r.fields["prompt"], "completion": rows[(i + 1) % len(rows)].fields["completion"]}, r.where)
               for i, r in enumerate(rows)]
    return _tokenised(path, rows, [own, shifted], cfg, tokenizer, max_length, desirable=labels)


def _as_completions(rows: list[Row], field: str) -> list[Row]:
    return [Row({"prompt": r.fields["prompt"], "completion": r.fields[field]}, r.where) for r in rows]


def _tokenised(path: str, rows: list[Row], sides: list[list[Row]], cfg: Any, tokenizer: Any, max_length: int,
               desirable: list[bool] | None) -> PreferenceSet:
    """Tokenise both sides of every row; a side longer than ``max_length`` is fitted by
    :func:`fit_example` (or is an error with ``data.overlong=error``), never dropped."""
    first, second, truncated = [], [], 0
    for i, row in enumerate(rows):
        pair, _ = tokenize_sft_rows([sides[0][i], sides[1][i]], "prompt_completion", tokenizer, 10**9, "error")
        if any(len(e.input_ids) > max_length for e in pair):
            if cfg.data.overlong == "error":
                raise DataError(f"{row.where}: {max(len(e.input_ids) for e in pair)} tokens, longer than "
                                f"data.max_length={max_length}; raise it or set data.overlong=truncate")
            truncated += 1
        first.append(fit_example(pair[0], max_length))
        second.append(fit_example(pair[1], max_length))
    if truncated:
        log.info("%s: %d of %d rows longer than data.max_length=%d were cut (completion head kept, then the end of "
                 "the prompt)", path, truncated, len(rows), max_length)
    return PreferenceSet(first + second, len(first), desirable)


def fit_example(example: Example, max_length: int) -> Example:
    """Fit prompt + completion into ``max_length`` tokens by the reward models' rule
    (:func:`alignloop.models.reward.fit_window`): the completion keeps its first tokens, the prompt
    its last ones (those next to the completion) and at least a quarter of the window."""
    if len(example.input_ids) <= max_length:
        return example
    start = example.loss_mask.index(1)  # first completion token
    keep_prompt, keep_completion = fit_window(start, len(example.input_ids) - start, max_length)
    kept = slice(start - keep_prompt, start + keep_completion)
    return Example(example.input_ids[kept], example.loss_mask[kept])


def split(data: PreferenceSet, fraction: float, seed: int) -> tuple[PreferenceSet, PreferenceSet | None]:
    """A seeded held-out share of the rows (both sides of each)."""
    train_idx, held_idx = split_holdout(list(range(data.n)), fraction, seed)
    if not held_idx:
        return data, None
    return subset(data, train_idx), subset(data, held_idx)


def subset(data: PreferenceSet, idx: list[int]) -> PreferenceSet:
    seqs = [data.sequences[i] for i in idx] + [data.sequences[data.n + i] for i in idx]
    labels = [data.desirable[i] for i in idx] if data.desirable is not None else None
    return PreferenceSet(seqs, len(idx), labels)


# ---------------------------------------------------------------------------------------------
# Reference log-probs, once
# ---------------------------------------------------------------------------------------------
def fingerprint(model_id: str, sets: Sequence[PreferenceSet]) -> str:
    h = hashlib.sha256(model_id.encode())
    for data in sets:
        for e in data.sequences:
            h.update(repr((e.input_ids, e.loss_mask)).encode())
    return h.hexdigest()[:16]


def completion_logps(model: Any, examples: Sequence[Example], pad_id: int, device: torch.device,
                     share_prefixes: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log π(completion tokens) (B,) of each example and how many there are: one forward, or
    with ``share_prefixes`` a prompt that several examples share (a pair's) run once
    (:mod:`alignloop.models.prefix`); the same numbers either way."""
    rows = [e.input_ids for e in examples]
    plan = plan_for(model, rows, [_first_completion_token(e) for e in examples], pad_id, share_prefixes)
    if plan is None:
        batch = to_device(collate(examples, pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return losses.sequence_logps(logits, batch["labels"])
    labels = plan.align([[t if m else IGNORE_INDEX for t, m in zip(e.input_ids, e.loss_mask)] for e in examples], IGNORE_INDEX)
    return losses.sequence_logps(shared_prefix_forward(model, plan.to(device)).logits, labels.to(device))


def _first_completion_token(example: Example) -> int:
    return example.loss_mask.index(1) if 1 in example.loss_mask else len(example.input_ids)


@torch.no_grad()
def sequence_logps_of(model: Any, sequences: Sequence[Example], pad_id: int, batch_size: int,
                      share_prefixes: bool = True) -> torch.Tensor:
    """Σ log π(completion tokens) of each sequence, float64. Batches hold sequences of similar
    length; with ``share_prefixes``, sequences of one prompt sit in the same batch (sorted by
    their prompt's longest sequence) so their prompt is run once."""
    device = next(model.parameters()).device
    out = torch.zeros(len(sequences), dtype=torch.float64)
    if share_prefixes:
        order = shared_prompt_order([tuple(e.input_ids[:_first_completion_token(e)]) for e in sequences],
                                    [len(e.input_ids) for e in sequences])
    else:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].input_ids))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        logps, _ = completion_logps(model, [sequences[i] for i in idx], pad_id, device, share_prefixes)
        out[idx] = logps.double().cpu()
    model.train(was_training)
    return out


def trained_examples(n: int, t: Any) -> list[int]:
    """The examples of an ``n``-row training set that ``t.max_steps`` steps draw, over every process:
    the batches the loop takes, in the loop's own order (:class:`ShuffledBatches`), so the reference
    pass scores what is trained and nothing more."""
    used: set[int] = set()
    processes = world_size()
    for rank in range(processes):
        batches = ShuffledBatches(n, t.batch_size, t.seed, rank, processes)
        for b in range(t.max_steps * t.grad_accum):
            used.update(batches.indices(b))
            if len(used) == n:
                return list(range(n))
    return sorted(used)


def reference_logps(cfg: Any, policy: Any, tokenizer: Any, run: Run, sets: Sequence[PreferenceSet],
                    needed: Sequence[Sequence[int]]) -> None:
    """Fill ``data.ref`` of each set for its examples ``needed`` (their sequences: both sides of a
    pair, a completion and its mismatched partner): from the run folder's cache, scoring and caching
    those it lacks. Rows not needed stay NaN.

    Called before training starts (and before a checkpoint is loaded), so the policy still holds
    the starting weights and can serve as the reference itself.
    """
    p = cfg.preference
    ref_id = p.ref_model or cfg.model.name_or_path
    key = fingerprint(f"{ref_id} at {'fp32' if cfg.train.precision == 'fp32' else 'bf16'}", sets)
    path = run.dir / REF_FILE
    for data in sets:
        data.ref = torch.full((len(data.sequences),), math.nan, dtype=torch.float64)
    if path.is_file():
        saved = torch.load(path)
        if saved.get("fingerprint") == key:
            for data, logps in zip(sets, saved["logps"]):
                data.ref = logps
    missing = [[i for i in data.rows(list(idx)) if math.isnan(data.ref[i])] for data, idx in zip(sets, needed)]
    if not any(missing):
        log.info("reference log-probs: reused %s", path)
        return
    started = time.perf_counter()
    if p.ref_model:
        reference = load_causal_lm(ModelConfig(name_or_path=p.ref_model), tokenizer, cfg.train.seed)  # its tokenizer: checked in _run
        context = contextlib.nullcontext()
    else:
        reference = policy
        context = policy.disable_adapter() if hasattr(policy, "disable_adapter") else contextlib.nullcontext()
    from alignloop.models.load import inference_device

    device = next(policy.parameters()).device
    reference.to(inference_device())
    with context, Precision.outside_session(cfg.train.precision, inference_device()):
        for data, rows in zip(sets, missing):
            if rows:
                data.ref[rows] = sequence_logps_of(reference, [data.sequences[i] for i in rows], tokenizer.pad_token_id,
                                                   p.ref_batch_size, cfg.train.share_prefixes)
    reference.to(device)
    release_freed_memory()
    run.dir.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": key, "model": ref_id, "logps": [d.ref for d in sets]}, path)
    log.info("reference log-probs of %d sequences (those the run reads, of %d) in %.1f s, cached in %s",
             sum(map(len, missing)), sum(len(d.sequences) for d in sets), time.perf_counter() - started, path)


def release_freed_memory() -> None:
    """Hand memory freed by the reference pass back to the OS (glibc keeps freed CPU tensors in
    its arenas, where the training step's differently sized tensors do not fit: measured +220 MB
    of peak RSS at 40M without this)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
def run_dpo(cfg: DPOConfig) -> Run:
    """``alignloop dpo``: pairs → a policy that prefers the chosen side."""
    if cfg.preference.loss not in losses.PAIR_LOSSES:  # before any data or model is loaded
        raise ConfigError(f"preference.loss: {cfg.preference.loss!r} is not one of {', '.join(losses.PAIR_LOSSES)}")
    return _run(cfg, kinds=STAGES["dpo"].reads, build=pair_set, title=losses.PAIR_LOSSES[cfg.preference.loss].title)


def run_kto(cfg: KTOConfig) -> Run:
    """``alignloop kto``: unpaired thumbs → a policy that favours thumbs-up completions."""
    return _run(cfg, kinds=STAGES["kto"].reads, build=thumbs_set, title="KTO")


def _run(cfg: Any, kinds: tuple[str, ...], build: Any, title: str) -> Run:
    tokenizer = load_tokenizer(cfg.model)
    check_reference_tokenizer(cfg.preference.ref_model, tokenizer, "preference.ref_model", "log-prob ratios need the same tokens")
    rows, _ = load_records(cfg.data.path, kinds, cfg.data.max_samples)
    held_rows = load_records(cfg.data.eval_path, kinds, cfg.data.max_samples)[0] if cfg.data.eval_path else None
    model = load_causal_lm(cfg.model, tokenizer, cfg.train.seed)
    from alignloop.models.load import disable_dropout

    disable_dropout(model)  # the policy's log-probs must be a function of the weights, as the reference's are
    max_length = resolve_max_length(cfg.data, model)
    train = build(cfg.data.path, rows, cfg, tokenizer, max_length)
    if held_rows:
        held = build(cfg.data.eval_path, held_rows, cfg, tokenizer, max_length)
    else:
        train, held = split(train, cfg.data.eval_fraction, cfg.train.seed)
    return fit_preference(cfg, model, tokenizer, train, held, title)


def batch_loss(cfg: Any, model: Any, data: PreferenceSet, idx: list[int], pad_id: int, device: torch.device,
               over_processes: Callable[[float], float] = lambda mean: mean) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of examples ``idx``: one forward over both sides (chosen + rejected, or KTO's
    completions; KTO's mismatched sequences go through a second, no-grad forward for z₀, whose
    mean ``over_processes`` takes over every process's examples in training)."""
    p = cfg.preference
    n = len(idx)
    kto = data.desirable is not None
    rows = idx if kto else data.rows(idx)
    share = cfg.train.share_prefixes
    logps, counts = completion_logps(model, [data.sequences[i] for i in rows], pad_id, device, share)
    ref = None  # SimPO has none
    if data.ref is not None:
        ref = data.ref[rows]
        if torch.isnan(ref).any():  # the reference pass scored other rows than the loop reads: a bug, not bad data
            raise RuntimeError("reference log-probs missing for rows this step reads; see trained_examples")
        ref = ref.to(device=device, dtype=logps.dtype)
    if kto:
        mismatched = [data.n + i for i in idx]
        with torch.no_grad():
            mm_logps, _ = completion_logps(model, [data.sequences[i] for i in mismatched], pad_id, device, share)
        z0 = losses.kto_reference_point(mm_logps, data.ref[mismatched].to(device=device, dtype=mm_logps.dtype), over_processes)
        desirable = torch.tensor([data.desirable[i] for i in idx], device=device)
        return losses.kto_loss(logps, ref, desirable, z0, p.beta, p.desirable_weight, p.undesirable_weight)
    chosen, rejected = logps[:n], logps[n:]
    pair_loss = losses.PAIR_LOSSES[p.loss]
    if pair_loss.uses_reference:
        loss, metrics = losses.dpo_loss(chosen, rejected, ref[:n], ref[n:], p.beta, p.loss, p.label_smoothing)
    else:
        loss, metrics = pair_loss.reference_free(chosen, rejected, counts[:n], counts[n:], p.beta, p.simpo_gamma)
    if p.rpo_alpha > 0:
        nll = losses.rpo_nll(chosen, counts[:n])
        loss = loss + p.rpo_alpha * nll
        metrics["nll"] = float(nll.detach())
    return loss, metrics


@torch.no_grad()
def evaluate_preferences(cfg: Any, model: Any, data: PreferenceSet, pad_id: int, device: torch.device) -> dict[str, float]:
    """The step metrics on held-out rows (all of them, in batches), prefixed ``eval/``."""
    model.eval()
    sums: dict[str, float] = {}
    batches = 0
    size = cfg.train.batch_size
    for start in range(0, data.n, size):
        idx = list(range(start, min(start + size, data.n)))
        loss, metrics = batch_loss(cfg, model, data, idx, pad_id, device)
        for k, v in {"loss": float(loss), **metrics}.items():
            if v == v:  # a NaN (e.g. no undesirable example in this batch) is left out of the mean
                sums[k] = sums.get(k, 0.0) + v * len(idx)
        batches += len(idx)
    model.train()
    return {f"eval/{k}": v / batches for k, v in sums.items()}


def fit_preference(cfg: Any, model: Any, tokenizer: Any, train: PreferenceSet, held: PreferenceSet | None, title: str) -> Run:
    """Train ``model`` on ``train`` with the configured preference loss; see the module docstring."""
    cfg, run = open_stage_run(cfg, train.n, title)
    if run.is_complete():
        return run
    t = cfg.train
    pad_id = tokenizer.pad_token_id
    if train.desirable is not None or losses.PAIR_LOSSES[cfg.preference.loss].uses_reference:
        # Only what max_steps will train on, and every held-out row (each evaluation reads them all).
        sets = [train] + ([held] if held else [])
        reference_logps(cfg, model, tokenizer, run, sets, [trained_examples(train.n, t)] + [range(d.n) for d in sets[1:]])
    with TrainingSession(cfg, model, run, title) as session:
        model, accelerator, device = session.model, session.accelerator, session.device
        batches = ShuffledBatches(train.n, t.batch_size, t.seed, accelerator.process_index, accelerator.num_processes)
        log.info("%s: %d training / %d held-out %s, %d steps of %d×%d×%d, run folder %s", title, train.n,
                 held.n if held else 0, "completions" if train.desirable is not None else "pairs", t.max_steps,
                 t.batch_size, t.grad_accum, accelerator.num_processes, run.dir)
        while session.running:
            started = time.perf_counter()
            model.train()
            sums: dict[str, list[float]] = {}
            for k in range(t.grad_accum):
                idx = batches.indices(session.step * t.grad_accum + k)
                with session.autocast():
                    loss, metrics = batch_loss(cfg, model, train, idx, pad_id, device, session.mean_over_processes_of)
                session.backward(loss / t.grad_accum)
                for name, v in {"loss": float(loss.detach()), **metrics}.items():
                    sums.setdefault(name, []).append(v)
            record = session.mean_over_processes({f"train/{k}": _nanmean(v) for k, v in sums.items()})
            trained = idx if train.desirable is not None else train.rows(idx)  # KTO's mismatched side has no gradient
            record["train/tokens"] = session.sum_over_processes(float(sum(sum(train.sequences[i].loss_mask) for i in trained)))
            record.update(session.optimizer_step())
            evaluate = (lambda: evaluate_preferences(cfg, model, held, pad_id, device)) if held else None
            session.end_step(record, started, evaluate)
        session.save_final(tokenizer)
    if accelerator.is_main_process:
        from alignloop.report.training import write_training_report

        write_training_report(run, title, curves=PREFERENCE_CURVES, ylabel="loss / accuracy")
    log.info("%s done: model in %s, report in %s", title, run.final_dir, run.dir / "report.md")
    return run


PREFERENCE_CURVES = (("train/loss", "train loss"), ("eval/loss", "held-out loss"),
                     ("train/rewards/accuracy", "preference accuracy"), ("eval/rewards/accuracy", "held-out accuracy"))


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")
