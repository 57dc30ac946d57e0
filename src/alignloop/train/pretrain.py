"""Continued pretraining: next-token loss on every token of raw text packed into equal blocks.

Pretraining is SFT in which every token is a completion token, so it shares SFT's loop
(:func:`alignloop.train.sft.fit_causal_lm`); only the data preparation differs.
"""

from __future__ import annotations

from alignloop.config import STAGES, PretrainConfig
from alignloop.data.batching import split_holdout
from alignloop.data.load import load_records
from alignloop.data.tokenize import pack_texts
from alignloop.models.load import load_causal_lm, load_tokenizer
from alignloop.runs import Run
from alignloop.train.sft import fit_causal_lm, resolve_max_length


def run_pretrain(cfg: PretrainConfig) -> Run:
    """``alignloop pretrain``: pack the text at ``data.path`` into blocks and train on all tokens."""
    tokenizer = load_tokenizer(cfg.model)
    texts = [row.fields["text"] for row in load_records(cfg.data.path, STAGES["pretrain"].reads, cfg.data.max_samples)[0]]
    held_texts = [row.fields["text"] for row in load_records(cfg.data.eval_path, STAGES["pretrain"].reads)[0]] if cfg.data.eval_path else None
    model = load_causal_lm(cfg.model, tokenizer, cfg.train.seed)
    block_size = resolve_max_length(cfg.data, model)
    train = pack_texts(texts, tokenizer, block_size)
    if held_texts:
        held_out = pack_texts(held_texts, tokenizer, block_size)
    else:
        train, held_out = split_holdout(train, cfg.data.eval_fraction, cfg.train.seed)
    return fit_causal_lm(cfg, model, tokenizer, train, held_out, title="pretrain")
