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


# ---------------------------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------------------------
def bradley_terry(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, tie: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley–Terry loss of a reward model on preference pairs (Ouyang et al. 2022, Eq. 1).

        P(y_c ≻ y_r) = σ(r_c − r_r − m)
        L = −(1/N) Σ_i [ (1 − t_i) · log σ(d_i − m_i) + t_i · ½ (log σ(d_i) + log σ(−d_i)) ],  d_i = r_c,i − r_r,i

    ``chosen``, ``rejected``: rewards (N,). ``margin`` m (N,), optional: how much better the chosen
    must be (Llama-2's margin loss, from a preference strength). ``tie`` t (N,) ∈ {0, 1},
    optional: a tie counts as half a win each way, whose minimum is at d = 0, so tied pairs pull
    the two rewards together instead of being thrown away.

    Metrics: ``accuracy`` (share of untied pairs with d > 0, ties in the score counting ½),
    ``margin`` (mean d), ``chosen``/``rejected`` (mean rewards).
    """
    d = chosen - rejected
    m = margin if margin is not None else torch.zeros_like(d)
    t = tie.to(d.dtype) if tie is not None else torch.zeros_like(d)
    win = F.logsigmoid(d - m)
    draw = 0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))
    loss = -((1 - t) * win + t * draw).mean()
    untied = t < 0.5
    correct = (d > 0).to(d.dtype) + 0.5 * (d == 0).to(d.dtype)
    accuracy = float(correct[untied].mean()) if bool(untied.any()) else float("nan")
    return loss, {
        "accuracy": accuracy,
        "margin": float(d.detach().mean()),
        "chosen": float(chosen.detach().mean()),
        "rejected": float(rejected.detach().mean()),
    }


def rating_regression(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean squared error of rewards against ratings already scaled to the reward's range.

        L = (1/N) Σ_i (r_i − y_i)²

    The caller maps a rating on [lo, hi] to y = 2·(rating − lo)/(hi − lo) − 1 ∈ [−1, 1] (or to a
    per-user z-score), so the reward reads on the same scale whatever the rating scale.
    Metrics: ``mse``, ``mae``.
    """
    err = scores - targets
    loss = (err**2).mean()
    return loss, {"mse": float(loss.detach()), "mae": float(err.detach().abs().mean())}


def ordinal_thresholds(raw: torch.Tensor) -> torch.Tensor:
    """Increasing thresholds θ_1 < … < θ_{K−1} from unconstrained parameters:
    θ_1 = raw_1, θ_k = θ_{k−1} + softplus(raw_k)."""
    return torch.cat([raw[:1], raw[:1] + torch.cumsum(F.softplus(raw[1:]), 0)])


def ordinal_rating(scores: torch.Tensor, levels: torch.Tensor, raw_thresholds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Cumulative-logit (proportional odds) loss for ratings on K ordered levels (McCullagh 1980).

        P(y > k | r) = σ(r − θ_k),  k = 1..K−1,   θ from :func:`ordinal_thresholds`
        P(y = k | r) = P(y > k−1) − P(y > k)        (P(y > 0) = 1, P(y > K) = 0)
        L = −(1/N) Σ_i log P(y = y_i | r_i)

    ``scores`` r (N,); ``levels`` y (N,) integer levels in 1..K; ``raw_thresholds`` (K−1,). The
    reward r is one number per response, higher = better, as with the other heads.
    Metrics: ``accuracy`` (most likely level = y), ``mae`` (in levels, of the expected level).
    """
    theta = ordinal_thresholds(raw_thresholds)
    above = torch.sigmoid(scores[:, None] - theta[None, :])  # (N, K−1): P(y > k)
    ones, zeros = torch.ones_like(scores[:, None]), torch.zeros_like(scores[:, None])
    cumulative = torch.cat([ones, above, zeros], dim=1)  # (N, K+1): P(y > k), k = 0..K
    probs = (cumulative[:, :-1] - cumulative[:, 1:]).clamp_min(1e-12)  # (N, K): P(y = k)
    index = (levels.long() - 1).unsqueeze(1)
    loss = -probs.log().gather(1, index).mean()
    probs = probs.detach()
    k = torch.arange(1, probs.size(1) + 1, dtype=probs.dtype, device=probs.device)
    expected = (probs * k).sum(1)
    return loss, {
        "accuracy": float((probs.argmax(1) + 1 == levels.long()).float().mean()),
        "mae": float((expected - levels).abs().mean()),
    }


def thumbs_bce(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Binary cross-entropy for thumbs up/down: the reward is the logit of P(good).

        L = −(1/N) Σ_i [ ℓ_i log σ(r_i) + (1 − ℓ_i) log σ(−r_i) ]

    ``scores`` r (N,), ``labels`` ℓ (N,) ∈ {0, 1}. Metrics: ``accuracy`` (σ(r) > ½ agrees with ℓ).
    """
    labels = labels.to(scores.dtype)
    loss = F.binary_cross_entropy_with_logits(scores, labels)
    return loss, {"accuracy": float(((scores > 0).to(scores.dtype) == labels).float().mean())}
