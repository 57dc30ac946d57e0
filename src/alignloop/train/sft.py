"""Supervised fine-tuning: next-token loss on completion tokens only.

``fit_causal_lm`` is the explicit loop shared with continued pretraining (which is SFT where
every token is a completion token): batch, forward, loss, backward, clip, step, log, maybe
evaluate, maybe checkpoint.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from alignloop.config import STAGES, DataConfig, SFTConfig
from alignloop.data.batching import ShuffledBatches, collate, split_holdout, to_device
from alignloop.data.load import load_records
from alignloop.data.records import Row
from alignloop.data.tokenize import Example, tokenize_sft_rows
from alignloop.errors import ConfigError, DataError
from alignloop.losses import completion_nll, count_loss_tokens
from alignloop.models.load import context_length, load_causal_lm, load_tokenizer
from alignloop.report.training import write_training_report
from alignloop.rollout.scoring import heldout_loss
from alignloop.runs import Run
from alignloop.train.loop import TrainingSession, open_stage_run

log = logging.getLogger("alignloop")

def run_sft(cfg: SFTConfig) -> Run:
    """``alignloop sft``: load the model and data named by ``cfg`` and train."""
    # Data is read and validated before the model loads: a typo should not wait for a 7B load.
    tokenizer = load_tokenizer(cfg.model)
    kinds = STAGES["sft"].reads
    records = load_records(cfg.data.path, kinds, cfg.data.max_samples)
    held_records = load_records(cfg.data.eval_path, kinds, cfg.data.max_samples) if cfg.data.eval_path else None
    model = load_causal_lm(cfg.model, tokenizer, cfg.train.seed)
    max_length = resolve_max_length(cfg.data, model)
    train = sft_examples(cfg.data.path, records, cfg.data, tokenizer, max_length)
    if held_records:
        held_out = sft_examples(cfg.data.eval_path, held_records, cfg.data, tokenizer, max_length)
    else:
        train, held_out = split_holdout(train, cfg.data.eval_fraction, cfg.train.seed)
    return fit_causal_lm(cfg, model, tokenizer, train, held_out, title="SFT")


def sft_examples(path: str, records: tuple[list[Row], str], data: DataConfig, tokenizer: Any, max_length: int) -> list[Example]:
    """Tokenise validated ``records`` (rows and their kind) read from ``path``."""
    rows, kind = records
    examples, stats = tokenize_sft_rows(rows, kind, tokenizer, max_length, data.overlong)
    if stats.truncated or stats.dropped:
        log.info("%s: %d records truncated, %d dropped (data.overlong=%s, max_length=%d)",
                 path, stats.truncated, stats.dropped, data.overlong, max_length)
    if not examples:
        raise DataError(f"{path}: no record has a completion token left within data.max_length={max_length}")
    return examples


def resolve_max_length(data: DataConfig, model: Any) -> int:
    """``data.max_length``, checked against the model's context; the context when unset."""
    context = context_length(model)
    if data.max_length is None:
        if context is None:
            raise ConfigError("data.max_length: the model's config gives no context length; set data.max_length")
        return context
    if context is not None and data.max_length > context:
        raise ConfigError(f"data.max_length={data.max_length} is longer than the model's context ({context} tokens); lower it")
    return data.max_length


def fit_causal_lm(cfg: Any, model: Any, tokenizer: Any, train: list[Example], held_out: list[Example], title: str) -> Run:
    """Train ``model`` on ``train`` with :func:`completion_nll`; evaluate on ``held_out``; save
    ``final/`` and ``report.md`` in the run folder. Resumes from the newest checkpoint when asked."""
    cfg, run = open_stage_run(cfg, len(train), title)
    if run.is_complete():
        return run
    t = cfg.train
    pad_id = tokenizer.pad_token_id
    with TrainingSession(cfg, model, run, title) as session:
        model, accelerator = session.model, session.accelerator
        batches = ShuffledBatches(len(train), t.batch_size, t.seed, accelerator.process_index, accelerator.num_processes)
        log.info("%s: %d training / %d held-out sequences, %d steps of %d×%d×%d, run folder %s",
                 title, len(train), len(held_out), t.max_steps, t.batch_size, t.grad_accum, accelerator.num_processes, run.dir)
        while session.running:
            started = time.perf_counter()
            model.train()
            micro_batches = [
                to_device(collate([train[i] for i in batches.indices(session.step * t.grad_accum + k)], pad_id), accelerator.device)
                for k in range(t.grad_accum)
            ]
            # One token count for the whole step, all processes: see completion_nll's docstring.
            step_tokens = session.sum_over_processes(float(sum(count_loss_tokens(b["labels"]) for b in micro_batches)))
            nll_sum = 0.0
            for k, batch in enumerate(micro_batches):
                last = k == len(micro_batches) - 1
                with session.accumulating(last):
                    with session.autocast():
                        # use_cache=False: a training forward has no use for a KV cache, which would cost memory and time
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
                    loss, stats = completion_nll(logits, batch["labels"], step_tokens / accelerator.num_processes)
                    session.backward(loss)
                nll_sum += stats["nll_sum"]
            record = {
                "train/loss": session.sum_over_processes(nll_sum) / step_tokens,
                "train/tokens": step_tokens,
                **session.optimizer_step(),
            }
            evaluate = (lambda: heldout_loss(model, held_out, t.batch_size, pad_id, t.eval_batches)) if held_out else None
            session.end_step(record, started, evaluate)
        session.save_final(tokenizer)
    if accelerator.is_main_process:
        write_training_report(run, title)
    log.info("%s done: model in %s, report in %s", title, run.final_dir, run.dir / "report.md")
    return run
