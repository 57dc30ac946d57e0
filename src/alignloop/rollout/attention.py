"""Attention for decode steps: one query a row, as plain products, with a prompt's keys and values
read once for all the samples that share it.

A decode step's attention reads every key and value in the cache for one query a row, so it costs
what reading the cache costs. Two things make torch's SDPA slower at it than it need be on the CPU:

* Its CPU flash kernel is built for long queries. With one query a row it spends more time
  setting up blocks than reading: at 40M's shapes (8 rows × 8 heads × 64, 129–256 keys) on a
  2-core Zen 5, 242–364 µs a layer in fp32 against 215–349 µs for the same maths as two batched
  products, and in bf16 491–853 µs against 291–499 µs.
* An RL rollout samples m completions of each prompt (a GRPO group). Their prompt columns hold
  the same keys and values, copied into each row by the prefill, and SDPA reads all m copies.
  :class:`SharedPrompt` says which rows share one; their queries are then stacked and multiplied
  by one copy (the first row's), so the prompt's keys and values are read once a group, not m
  times. At 2 prompts × 4 samples of 128 + 128 tokens a step reads on average half the cache.

Whole rollouts at 40M (8 rows = 2 prompts × 4 samples, 128 + 128 tokens, 2 threads, one process
alternating on and off, median of 5) on a 2-core Zen 4: bf16 338 → 423 decoded tok/s; fp32 329
→ 319, within that machine's noise (fp32 decode there is bound by the weights' reads).

:func:`decode_step_attention` is registered with transformers' ``AttentionInterface`` and
:func:`decode_attention` switches a model to it for the length of a block (the rollout's decode
loop). Anything that is not a decode step, or that it does not handle (dropout, a soft cap,
attention sinks, a sliding window, position bias), goes to transformers' own SDPA function
unchanged. The cache still holds every row's full keys and values, so a model whose attention
does not go through the interface is unaffected.

Maths, for row i with query q (one per head; under grouped-query attention the r = H / H_kv query
heads that share a key head are stacked as r query rows against it), keys K_i and values V_i of
its S cached positions, padding mask M_i and scale s:

    scores  = s · q K_iᵀ,  −∞ where M_i is false
    p       = softmax(scores)                       (in fp32)
    output  = p V_i

With a shared prompt of P columns, K_i = [K_g ; K_i'] and V_i = [V_g ; V_i'], where K_g, V_g are
group g's prompt (rows g·m … g·m + m − 1) and K_i', V_i' the row's own sampled positions. The
scores over K_g are one product for the group's stacked m·r queries, those over K_i' one a row;
one softmax runs over both parts together, and output = p[:P] V_g + p[P:] V_i'. That is the same
sum over the same positions, so it equals the plain formula up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "alignloop_decode"  # the name it is registered under, next to "sdpa"
_UNHANDLED = ("softcap", "s_aux", "sliding_window", "position_bias")  # kwargs that send a call to SDPA


@dataclass(frozen=True, eq=False)
class SharedPrompt:
    """Rows g·m … g·m + m − 1 of a decode batch (m = ``samples``) are samples of one prompt, and
    the first ``width`` columns of their cached keys and values are that prompt's (left-padded to
    ``width``). ``keys[i]`` and ``values[i]`` are layer i's for the G prompts alone, (G, H_kv,
    width, D): the prefill's own cache, before it was copied to each sample's row. Attention reads
    these rather than a strided view of every m-th row, which a batched product would first copy."""

    samples: int
    width: int
    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]


def decode_step_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_prompt: SharedPrompt | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` (B, H, Q, D), ``key``/``value``
    (B, H_kv, S, D), ``attention_mask`` broadcastable to (B, 1, Q, S), boolean (True attends) or
    additive. Returns the output as (B, Q, H, D) and no weights. Decode steps (Q = 1) are computed
    as in the module docstring; anything else goes to SDPA."""
    if query.shape[2] != 1 or dropout or any(kwargs.get(k) is not None for k in _UNHANDLED):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    per_kv = heads // kv_heads  # r query heads per key head
    scale = dim ** -0.5 if scaling is None else scaling
    q = query.reshape(rows, kv_heads, per_kv, dim)  # (B, H_kv, r, D)

    layer = getattr(module, "layer_idx", None)
    m = shared_prompt.samples if shared_prompt is not None and layer is not None else 1
    width = shared_prompt.width if m > 1 and rows % m == 0 and shared_prompt.width < length else 0
    groups = rows // m if width else rows
    if width:
        grouped_q = q.reshape(groups, m, kv_heads, per_kv, dim).transpose(1, 2).reshape(groups, kv_heads, m * per_kv, dim)
        prompt_keys, prompt_values = shared_prompt.keys[layer], shared_prompt.values[layer]  # (G, H_kv, P, D)
        prompt_scores = torch.matmul(grouped_q, prompt_keys.transpose(-1, -2))  # (G, H_kv, m·r, P)
        prompt_scores = prompt_scores.reshape(groups, kv_heads, m, per_kv, width).transpose(1, 2).reshape(rows, kv_heads, per_kv, width)
        own_scores = torch.matmul(q, key[:, :, width:].transpose(-1, -2))  # (B, H_kv, r, S − P)
        scores = torch.cat([prompt_scores, own_scores], dim=-1).float()
    else:
        scores = torch.matmul(q, key.transpose(-1, -2)).float()  # (B, H_kv, r, S)
    scores.mul_(scale)
    if attention_mask is not None:
        mask = attention_mask[..., -length:].reshape(rows, 1, 1, length)  # one query: (B, 1, 1, S)
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    probs = scores.softmax(dim=-1).to(value.dtype)

    if width:
        prompt_probs = probs[..., :width].reshape(groups, m, kv_heads, per_kv, width).transpose(1, 2)
        prompt_out = torch.matmul(prompt_probs.reshape(groups, kv_heads, m * per_kv, width), prompt_values)
        out = prompt_out.reshape(groups, kv_heads, m, per_kv, dim).transpose(1, 2).reshape(rows, kv_heads, per_kv, dim)
        out = out + torch.matmul(probs[..., width:], value[:, :, width:])
    else:
        out = torch.matmul(probs, value)  # (B, H_kv, r, D)
    return out.reshape(rows, 1, heads, dim), None


AttentionInterface.register(NAME, decode_step_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # a prefill under the switch builds SDPA's masks


@contextmanager
def decode_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Inside the block, a model on SDPA whose attention goes through transformers'
    ``AttentionInterface`` runs :func:`decode_step_attention`; yields whether it does, i.e.
    whether its forward accepts the ``shared_prompt`` keyword. Other models run as they are."""
    base = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not base._can_set_attn_implementation():
        yield False
        return
    config._attn_implementation = NAME  # the setter passes it on to sub-configs
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
