"""Losses: small pure functions of tensors, each returning ``(loss, metrics)``.

They take logits or log-probabilities, never models, so each can be checked against a value
computed by hand on a few numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def completion_nll(logits: torch.Tensor, labels: torch.Tensor, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy on the tokens that carry loss, divided by a given token count.

        L = −(1/N) · Σ_{b,t : y[b,t] ≠ −100} log p_θ(y[b,t] | x[b,<t])

    Shapes: ``logits`` (B, T, V) from a causal LM over ``x``; ``labels`` (B, T) with ``y = x`` where
    the token is trained (completion; every token when pretraining) and −100 elsewhere (prompt,
    chat-template scaffolding, padding). Position t's logits predict token t+1, so the two are
    shifted by one here.

    ``N`` is the number of loss tokens in the whole optimizer step (all micro-batches, divided by
    the processes whose gradients are averaged), not in this micro-batch: summing, then dividing
    by one global count makes 1 micro-batch × 8 accumulation steps give the same gradient as
    8 × 1, and 2 processes the same as 1 (a per-micro-batch mean would weight short batches more).

    Metrics: ``nll_sum`` (the summed negative log-likelihood) and ``tokens`` (loss tokens here).
    """
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    nll_sum = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    tokens = int((shifted_labels != IGNORE_INDEX).sum())
    return nll_sum / num_tokens, {"nll_sum": float(nll_sum.detach()), "tokens": tokens}


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens :func:`completion_nll` puts loss on: labels after the first position that are not −100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
