"""Losses: small pure functions of tensors, each returning ``(loss, metrics)``.

They take logits or log-probabilities, never models, so each can be checked against a value
computed by hand on a few numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from alignloop.advantages import masked_var
from alignloop.data.batching import IGNORE_INDEX


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
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, tie: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley–Terry loss of a reward model on preference pairs (Ouyang et al. 2022, Eq. 1).

        P(y_c ≻ y_r) = σ(r_c − r_r − m)
        L = −(1/N) Σ_i [ (1 − t_i) · log σ(d_i − m_i) + t_i · ½ (log σ(d_i) + log σ(−d_i)) ],  d_i = r_c,i − r_r,i
            + c · (1/N) Σ_i (r_c,i + r_r,i)²

    ``chosen``, ``rejected``: rewards (N,). ``margin`` m (N,), optional: how much better the chosen
    must be (Llama-2's margin loss, from a preference strength). ``tie`` t (N,) ∈ {0, 1},
    optional: a tie counts as half a win each way, whose minimum is at d = 0, so tied pairs pull
    the two rewards together instead of being thrown away. ``center_coef`` c ≥ 0: the BT term sees
    only differences, so the rewards' level drifts freely; the last term pins each pair's mean
    near 0 (Eisenstein et al. 2023; TRL's ``center_rewards_coefficient``, 0.01 there), so the
    rewards can feed RL without a running normaliser.

    Metrics: ``accuracy`` (share of untied pairs with d > 0, ties in the score counting ½),
    ``margin`` (mean d), ``chosen``/``rejected`` (mean rewards).
    """
    d = chosen - rejected
    m = margin if margin is not None else torch.zeros_like(d)
    t = tie.to(d.dtype) if tie is not None else torch.zeros_like(d)
    win = F.logsigmoid(d - m)
    draw = 0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))
    loss = -((1 - t) * win + t * draw).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
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


# ---------------------------------------------------------------------------------------------
# Online RL
# ---------------------------------------------------------------------------------------------
# Shapes: B sequences, T response tokens; ``mask`` (B, T) is 1 on real response tokens, 0 on the
# padding after EOS. Log-probabilities are of the sampled tokens, log π(y_t | x, y_<t), (B, T).
KL_ESTIMATORS = {
    "k1": lambda log_ratio: -log_ratio,
    "k2": lambda log_ratio: 0.5 * log_ratio**2,
    "k3": lambda log_ratio: torch.expm1(log_ratio) - log_ratio,  # expm1: no cancellation in e^r − 1 for r ≈ 0
}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate (B, T) of KL(π ‖ π_ref) from tokens sampled from π.

    With r = log π_ref(y_t|·) − log π(y_t|·) (Schulman, "Approximating KL Divergence", 2020,
    http://joschu.net/blog/kl-approx.html):

        k1 = −r = log π − log π_ref          unbiased, high variance, can be negative
        k2 = ½ r²                            biased, low variance; its gradient is the KL's gradient
        k3 = (e^r − 1) − r ≥ 0               unbiased (E_π[e^r] = 1), low variance when π ≈ π_ref

    Padding is not masked here; the caller reduces with its mask.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](ref_logprobs - logprobs)


def _masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over valid tokens, per row (B,); padding is never read, so a NaN there stays out of the sum."""
    mask = mask.to(per_token.dtype)
    return (torch.where(mask > 0, per_token, torch.zeros_like(per_token)) * mask).sum(dim=1)


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    return _masked_sum(per_token, mask).sum() / mask.sum().clamp_min(1)


def _sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    return (_masked_sum(per_token, mask) / mask.sum(dim=1).clamp_min(1)).mean()


def _constant_normaliser(per_token: torch.Tensor, mask: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    return _masked_sum(per_token, mask).sum() / (per_token.size(0) * (max_tokens or per_token.size(1)))


TOKEN_AGGREGATIONS = {"token": _token_mean, "sequence": _sequence_mean, "dr_grpo": _constant_normaliser}


def aggregate_token_loss(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_tokens: int | None = None
) -> torch.Tensor:
    """Reduce a per-token loss ℓ (B, T) to a scalar over the valid tokens (m = mask, L_i = Σ_t m_it).

        "token"     L = Σ_{i,t} m·ℓ / Σ_i L_i                 every token weighs the same (DAPO, Yu et al. 2025)
        "sequence"  L = (1/B) Σ_i (1/L_i) Σ_t m·ℓ             every sequence weighs the same (GRPO, Shao et al. 2024)
        "dr_grpo"   L = Σ_{i,t} m·ℓ / (B · max_tokens)        a constant divisor, no length bias (Dr. GRPO,
                                                              Liu et al. 2025); max_tokens defaults to T

    "sequence" favours short answers when A > 0 and long ones when A < 0 (each token of a short
    sequence weighs more); "token" and "dr_grpo" do not. A sequence with no valid token counts as 0.
    The counts are of this batch: a caller accumulating micro-batches that wants "token" to be
    invariant to the split should use "dr_grpo" or rescale by its global token count.
    """
    if mode not in TOKEN_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(TOKEN_AGGREGATIONS)}")
    return TOKEN_AGGREGATIONS[mode](per_token, mask, max_tokens)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    aggregation: str = "token",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), negated to a loss, per token then aggregated.

        ρ_t = exp(log π(y_t) − log π_old(y_t))
        ℓ_t = max(−A_t · ρ_t, −A_t · clip(ρ_t, 1 − ε_low, 1 + ε_high))
        L   = aggregate_token_loss(ℓ, mask, aggregation, max_tokens)

    ``logprobs`` (B, T) under the policy being trained (with gradient); ``old_logprobs`` (B, T)
    from the policy that sampled; ``advantages`` (B,) one per sequence (GRPO, RLOO: broadcast over
    its tokens) or (B, T) per token (PPO's GAE). ε_high defaults to ε_low; a larger ε_high is
    DAPO's clip-higher (Yu et al. 2025), room for unlikely tokens to grow.

    Metrics, over valid tokens: ``clip_fraction`` (share where the clipped term is strictly the
    larger, so the token has no gradient), ``approx_kl`` (mean k3 of KL(π_old ‖ π) on the old
    policy's samples: (ρ − 1) − log ρ), ``ratio_mean`` (mean ρ).
    """
    clip_high = clip_low if clip_high is None else clip_high
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (B, 1): one advantage for every token of the sequence
    valid = mask.bool()
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))  # padding: ρ = 1, no inf
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = aggregate_token_loss(torch.maximum(unclipped, clipped), mask, aggregation, max_tokens)
    with torch.no_grad():
        return loss, {
            "clip_fraction": float((clipped > unclipped)[valid].float().mean()),
            "approx_kl": float(kl_estimate(old_logprobs, logprobs, "k3")[valid].mean()),
            "ratio_mean": float(ratio[valid].mean()),
        }


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    aggregation: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value loss (as in OpenAI baselines' ppo2), per token then aggregated.

        V_clip = V_old + clip(V − V_old, −c, c)
        ℓ_t    = ½ · max((V − R)², (V_clip − R)²)
        L      = aggregate_token_loss(ℓ, mask, aggregation)

    ``values`` V (B, T) from the critic being trained; ``old_values`` V_old (B, T) from rollout
    time; ``returns`` R (B, T), the targets (:func:`alignloop.advantages.gae`). The clip keeps the
    critic near the values that produced the advantages. Metric ``value_clip_fraction``: share of
    valid tokens where the clipped term is strictly the larger.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = aggregate_token_loss(0.5 * torch.maximum(unclipped_error, clipped_error), mask, aggregation)
    with torch.no_grad():
        clipped_share = (clipped_error > unclipped_error)[mask.bool()].float().mean()
    return loss, {"value_clip_fraction": float(clipped_share)}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """How much of the returns' variance the critic explains, over valid tokens.

        EV = 1 − Var[R − V] / Var[R]

    1: perfect; 0: no better than predicting the mean; < 0: worse than that. NaN when Var[R] = 0.
    """
    with torch.no_grad():
        var_returns = float(masked_var(returns, mask, unbiased=False))
        if var_returns == 0:
            return float("nan")
        return 1.0 - float(masked_var(returns - values, mask, unbiased=False)) / var_returns


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (B, T) of the next-token distribution softmax(logits), in float32.

        H = −Σ_v p_v log p_v,   log p = z − logsumexp(z)

    ``logits`` z (B, T, V) in any float dtype. log_softmax subtracts logsumexp, so large logits do
    not overflow; a −inf logit (a banned token) has p = 0 and contributes 0, not NaN.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Offline preference optimisation
# ---------------------------------------------------------------------------------------------
# Inputs are per-sequence sums of the completion tokens' log-probabilities, (N,) for N pairs
# (or N unpaired completions for KTO): π = log π_θ(y|x) under the policy (with gradient),
# ref = log π_ref(y|x) under the frozen reference. :func:`sequence_logps` makes them from logits.
def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens, and how many there are.

        log π(y|x) = Σ_{t : y[b,t] ≠ −100} log p_θ(y[b,t] | x[b,<t])

    Shapes: ``logits`` (B, T, V) from a causal LM, any float dtype; ``labels`` (B, T), the token
    ids where the completion is, ``ignore_index`` elsewhere (prompt, padding). Shifted by one as
    in :func:`completion_nll`: position t's logits predict token t+1. Returns the sums (B,) in
    float32 and the token counts |y| (B,) as int64 — the lengths SimPO and the RPO term divide by.
    log_softmax subtracts the logsumexp, so large logits do not overflow.
    """
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)  # (B, T−1, V)
    targets = labels[:, 1:]
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))  # −100 is no index for gather
    token_logp = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (B, T−1)
    token_logp = torch.where(keep, token_logp, torch.zeros_like(token_logp))
    return token_logp.sum(dim=1), keep.sum(dim=1)


def _preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
) -> dict[str, float]:
    """The logged diagnostics of a pairwise loss, from implicit rewards (N,) and policy log-probs (N,)."""
    with torch.no_grad():
        margin = chosen_rewards - rejected_rewards
        return {
            "rewards/chosen": float(chosen_rewards.mean()),
            "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/margin": float(margin.mean()),
            "rewards/accuracy": float((margin > 0).float().mean()),  # a tie is not a win
            "logps/chosen": float(policy_chosen.mean()),
            "logps/rejected": float(policy_rejected.mean()),
        }


def _check_lengths(lengths: torch.Tensor, name: str) -> None:
    empty = (lengths < 1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{name} has completions with no tokens at rows {empty}; a length-normalised loss divides by "
            "the length: drop them or raise data.max_length so the completion is not truncated away"
        )


def _dpo_sigmoid(h: torch.Tensor, beta: float, eps: float, tau: float) -> torch.Tensor:
    # DPO (Rafailov et al. 2023, Eq. 7); with ε > 0, cDPO (Mitchell 2023, Eq. 3)
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _dpo_robust(h: torch.Tensor, beta: float, eps: float, tau: float) -> torch.Tensor:
    # rDPO (Chowdhury et al. 2024, arXiv:2403.00409): the debiased loss under flip rate ε
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _dpo_ipo(h: torch.Tensor, beta: float, eps: float, tau: float) -> torch.Tensor:
    # IPO (Azar et al. 2023, arXiv:2310.12036v2, Eq. 17)
    return (h - 1 / (2 * tau)) ** 2


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ipo_tau: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO and its variants on preference pairs, averaged over the N pairs.

        h = (π_c − ref_c) − (π_r − ref_r)                       (N,)
        "sigmoid"  L = −(1−ε) log σ(βh) − ε log σ(−βh)           DPO (Rafailov et al. 2023, Eq. 7) when ε = 0;
                                                               cDPO (Mitchell 2023, "A note on DPO with noisy
                                                               preferences", Eq. 3) when ε > 0
        "robust"   L = [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1−2ε)  rDPO (Chowdhury et al. 2024,
                                                               "Provably Robust DPO"), 0 ≤ ε < ½
        "ipo"      L = (h − 1/(2τ))²,  τ = ipo_tau or β         IPO (Azar et al. 2023, Eq. 17)

    ``policy_*``, ``ref_*``: summed completion log-probs (N,) (:func:`sequence_logps`).
    ``label_smoothing`` ε is the assumed probability that a pair's label is flipped. The two
    ways of using it differ: cDPO trains towards the soft target P(c ≻ r) = 1 − ε, so its
    gradient vanishes at βh = log((1−ε)/ε) and the margin stops growing there; rDPO is an
    unbiased estimate of the clean DPO loss under flips at rate ε ((1−ε)·L(h) + ε·L(−h) =
    −log σ(βh)), keeps pushing h up, and is unbounded below (negative for large βh).

    IPO: τ defaults to β, TRL's convention (``beta`` is τ); ``ipo_tau`` sets it apart from β,
    which still scales the logged rewards. The IPO authors apply it to log-probs averaged over
    the completion's tokens, not summed; that choice is the caller's — pass π/|y| and ref/|y|.

    Metrics, with implicit rewards r = β·(π − ref): ``rewards/chosen``, ``rewards/rejected``
    (means), ``rewards/margin`` (mean r_c − r_r = mean βh), ``rewards/accuracy`` (share of pairs
    with r_c > r_r strictly), ``logps/chosen``, ``logps/rejected`` (mean π).
    """
    margin_losses = [name for name, pair_loss in PAIR_LOSSES.items() if pair_loss.margin is not None]
    if loss_type not in margin_losses:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(margin_losses)}")
    if label_smoothing < 0:
        raise ValueError(f"label_smoothing must be ≥ 0 (a flip probability), got {label_smoothing}")
    if loss_type == "robust" and label_smoothing >= 0.5:
        raise ValueError(f"robust DPO needs label_smoothing < 0.5 (it divides by 1 − 2ε), got {label_smoothing}")
    # refused rather than ignored: a setting that silently does nothing looks like it was tried
    if loss_type == "ipo" and label_smoothing > 0:
        raise ValueError("label_smoothing has no effect on loss_type 'ipo'; use 'sigmoid' or 'robust', or set it to 0")
    if loss_type != "ipo" and ipo_tau is not None:
        raise ValueError(f"ipo_tau only applies to loss_type 'ipo', not {loss_type!r}; leave it unset")
    tau = beta if ipo_tau is None else ipo_tau
    if loss_type == "ipo" and tau <= 0:
        raise ValueError(f"IPO needs τ > 0 (it divides by 2τ), got {tau}; set beta or ipo_tau")

    chosen_log_ratio = policy_chosen - ref_chosen
    rejected_log_ratio = policy_rejected - ref_rejected
    h = chosen_log_ratio - rejected_log_ratio
    loss = PAIR_LOSSES[loss_type].margin(h, beta, label_smoothing, tau).mean()
    return loss, _preference_metrics(beta * chosen_log_ratio, beta * rejected_log_ratio, policy_chosen, policy_rejected)


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6): reference-free, length-normalised.

        r = β · π / |y|                     the implicit reward: mean token log-prob, scaled
        L = −(1/N) Σ_i log σ(r_c,i − r_r,i − γ)

    ``policy_*`` summed completion log-probs (N,); ``*_lengths`` |y| (N,), completion token
    counts (:func:`sequence_logps`), each ≥ 1. γ is the target reward margin, in reward units
    (TRL's ``gamma_beta_ratio`` is γ/β). Metrics as :func:`dpo_loss`, with this r; the margin
    is r_c − r_r, without γ.
    """
    _check_lengths(chosen_lengths, "chosen_lengths")
    _check_lengths(rejected_lengths, "rejected_lengths")
    chosen_rewards = beta * policy_chosen / chosen_lengths
    rejected_rewards = beta * policy_rejected / rejected_lengths
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    return loss, _preference_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)


@dataclass(frozen=True)
class PairLoss:
    """A preference loss on pairs: one row of :data:`PAIR_LOSSES`, the table ``preference.loss`` names.

    A loss of the DPO family is a per-pair function of the log-ratio margin h (``margin``, called
    by :func:`dpo_loss` with h, β, ε, τ); a reference-free one is a whole loss of the policy's
    log-probs and lengths (``reference_free``: π_c, π_r, |y_c|, |y_r|, β, γ → (loss, metrics))."""

    title: str  # its name in logs and reports
    margin: Optional[Callable[[torch.Tensor, float, float, float], torch.Tensor]] = None
    reference_free: Optional[Callable[..., tuple[torch.Tensor, dict[str, float]]]] = None

    @property
    def uses_reference(self) -> bool:
        """Whether training needs the reference model's log-probs (computed once, before training)."""
        return self.margin is not None


PAIR_LOSSES: dict[str, PairLoss] = {
    "sigmoid": PairLoss("DPO", margin=_dpo_sigmoid),
    "robust": PairLoss("rDPO", margin=_dpo_robust),
    "ipo": PairLoss("IPO", margin=_dpo_ipo),
    "simpo": PairLoss("SimPO", reference_free=simpo_loss),
}


def rpo_nll(policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of the chosen completions, averaged over pairs: RPO's extra term
    (Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733).

        L_NLL = (1/N) Σ_i −π_c,i / |y_c,i|

    The trainer adds α·L_NLL to a preference loss, keeping the chosen completions likely while
    the margin grows. Each pair weighs the same whatever its length (TRL's ``rpo_alpha`` instead
    averages over all chosen tokens of the batch, so long completions weigh more).
    """
    _check_lengths(chosen_lengths, "chosen_lengths")
    return (-policy_chosen / chosen_lengths).mean()


def kto_reference_point(policy_mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor,
                        over_processes: Callable[[float], float] = lambda mean: mean) -> float:
    """KTO's reference point z₀, an estimate of KL(π_θ ‖ π_ref) (Ethayarajh et al. 2024, §4).

        z₀ = max(0, (1/M) Σ_j (π(y'_j|x_j) − ref(y'_j|x_j)))

    over M mismatched pairs: each prompt x_j with another example's completion y'_j, so the
    estimate does not depend on how well the policy fits the labelled pairs. It is a plain
    float: no gradient flows through z₀. With several processes the mean is over all of them, as
    TRL's is: ``over_processes`` turns this process's mean into theirs (each holds as many pairs),
    before the clamp.
    """
    with torch.no_grad():
        return max(0.0, over_processes(float((policy_mismatched_logps - ref_mismatched_logps).float().mean())))


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_reference: float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO on unpaired completions (Ethayarajh et al. 2024, arXiv:2402.01306, §4).

        r_i = π_i − ref_i                              (N,) per-sequence log-ratio
        ℓ_i = λ_D · (1 − σ(β (r_i − z₀)))   if desirable
        ℓ_i = λ_U · (1 − σ(β (z₀ − r_i)))   otherwise
        L   = (1/N) Σ_i ℓ_i

    ``policy_logps``, ``ref_logps``: summed completion log-probs (N,); ``desirable`` (N,) bool,
    thumbs-up; ``kl_reference`` z₀ from :func:`kto_reference_point` (a float: no gradient). The
    paper suggests λ_D·n_D / (λ_U·n_U) in [1, 4/3] when the classes are imbalanced.

    Metrics: ``rewards/chosen`` / ``rewards/rejected`` (mean β·r over desirable / undesirable
    examples, NaN if the batch has none), ``rewards/margin`` (their difference, NaN unless both
    exist), ``kl`` (z₀), ``logps/chosen`` / ``logps/rejected`` (mean π over each class, NaN if
    none). No ``rewards/accuracy``: without pairs there is nothing to rank.
    """
    desirable = desirable.bool()
    log_ratio = policy_logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - kl_reference))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl_reference - log_ratio))),
    )
    loss = losses.mean()

    def class_mean(values: torch.Tensor, rows: torch.Tensor) -> float:
        return float(values[rows].mean()) if bool(rows.any()) else float("nan")

    with torch.no_grad():
        rewards = beta * log_ratio
        chosen, rejected = class_mean(rewards, desirable), class_mean(rewards, ~desirable)
        return loss, {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margin": chosen - rejected,  # NaN when either class is missing
            "kl": float(kl_reference),
            "logps/chosen": class_mean(policy_logps, desirable),
            "logps/rejected": class_mean(policy_logps, ~desirable),
        }


# ---------------------------------------------------------------------------------------------
# Classifiers from bandit feedback: a user marks the shown prediction correct or wrong
# ---------------------------------------------------------------------------------------------
# N logged predictions. ``shown_logps`` (N,) log π_θ(a_i|x_i): the log-probability of the shown
# output a_i under the classifier being trained, with gradient (for an NER entity, the sum over its
# words of the log-probabilities of the shown tags B-T, I-T, ...). ``propensities`` p_i (N,): the
# probability with which the logging policy chose a_i, stored when it was served
# (rollout/exploration.py). ``rewards`` r_i (N,) in [0, 1]: 1 = the user said correct, 0 = wrong.
# Every estimator reads π_θ through the importance weight w_i = π_θ(a_i|x_i) / p_i.
def importance_weights(shown_logps: torch.Tensor, propensities: torch.Tensor) -> torch.Tensor:
    """w_i = π_θ(a_i|x_i) / p_i = exp(log π_θ(a_i|x_i) − log p_i), (N,), in float32.

    Computed in log space: a shown output of tiny propensity (1e-6) does not overflow until π_θ's
    log-probability is 14 nats above it."""
    return torch.exp(shown_logps.float() - propensities.float().log())


def _bandit_metrics(weights: torch.Tensor, rewards: torch.Tensor) -> dict[str, float]:
    """Diagnostics of one batch of importance weights w (N,) and rewards r (N,)."""
    with torch.no_grad():
        w, r = weights.float(), rewards.float()
        total = w.sum()
        return {
            # Σ r w / Σ w: the users' accuracy π_θ would get, estimated from the log (SNIPS)
            "bandit/snips": float((r * w).sum() / total.clamp_min(1e-12)),
            # S = (1/N) Σ w: 1 in expectation for any π_θ; far from 1, the estimates above are
            # unreliable (BanditNet's control variate)
            "bandit/weight_mean": float(w.mean()),
            "bandit/weight_max": float(w.max()),
            # (Σ w)² / (N Σ w²): the share of rows that effectively count (1: all equal weights)
            "bandit/ess": float(total**2 / (w.numel() * (w**2).sum()).clamp_min(1e-12)),
            "bandit/reward": float(r.mean()),
        }


def banditnet_loss(
    shown_logps: torch.Tensor, propensities: torch.Tensor, rewards: torch.Tensor, translation: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """BanditNet's λ-translated IPS risk (Joachims, Swaminathan & de Rijke 2018, "Deep Learning
    with Logged Bandit Feedback", ICLR), in rewards instead of losses:

        w_i = π_θ(a_i|x_i) / p_i
        L   = −(1/N) Σ_i (r_i − λ) · w_i

    Why the translation: the self-normalised estimate of π_θ's reward,

        R̂_SNIPS(θ) = Σ_i r_i w_i / Σ_i w_i,

    is the estimator to optimise (it is equivariant: adding a constant to every reward adds the
    same constant to it, so a model cannot score by moving probability off the logged outputs,
    "propensity overfitting"), but a ratio of two sums has no unbiased mini-batch gradient. Fix
    the denominator's value, S(θ) = (1/N) Σ_i w_i = S: maximising R̂_SNIPS is then maximising the
    IPS sum under that constraint, whose Lagrangian is (1/N) Σ_i (r_i − λ) w_i + λS. So each λ
    gives the SNIPS optimum at some S, and a plain mean over rows, fit for SGD, is minimised.
    Note that Σ (r_i − λ) w_i / Σ w_i = R̂_SNIPS − λ: translating the self-normalised ratio itself
    changes nothing; λ acts only in the unnormalised sum. The paper searches λ (its losses
    δ = 1 − r make its λ our 1 − λ) and picks by the SNIPS estimate on held-out logs.

    λ is a baseline: with λ = 0 and r ∈ {0, 1} a "wrong" row has no gradient at all (and every
    weight is rewarded for growing); with 0 < λ < 1 a confirmed output is pushed up with weight
    (1 − λ) and a rejected one down with weight λ. ∂L/∂log π_θ(a_i|x_i) = −(r_i − λ) w_i / N.

    Metrics: ``bandit/snips`` (R̂_SNIPS, the users' accuracy π_θ would get, estimated),
    ``bandit/weight_mean`` (S: 1 in expectation; far from 1 the estimate is unreliable),
    ``bandit/weight_max``, ``bandit/ess`` ((Σw)²/(N Σw²)), ``bandit/reward`` (mean r logged).
    """
    w = importance_weights(shown_logps, propensities)
    loss = -((rewards.float() - translation) * w).mean()
    return loss, _bandit_metrics(w, rewards)


def clipped_ips_loss(
    shown_logps: torch.Tensor, propensities: torch.Tensor, rewards: torch.Tensor, translation: float = 0.5,
    clip: float = 10.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped (truncated) inverse propensity scoring (Ionides 2008; Bottou et al. 2013;
    the IPS term of CRM, Swaminathan & Joachims 2015), translated by a baseline λ as above:

        L = −(1/N) Σ_i (r_i − λ) · min(w_i, M),   w_i = π_θ(a_i|x_i) / p_i

    Clipping caps what one row can contribute: an explored output (p_i = ε/K, w_i up to K/ε)
    cannot dominate a batch. The price is bias (towards outputs the logging policy already
    showed often), and no gradient through a row once w_i > M: its probability stops moving.
    Metrics as :func:`banditnet_loss`, plus ``bandit/clipped`` (share of rows with w_i > M).
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0 (the largest importance weight kept), got {clip}")
    w = importance_weights(shown_logps, propensities)
    loss = -((rewards.float() - translation) * torch.clamp(w, max=clip)).mean()
    metrics = _bandit_metrics(w, rewards)
    metrics["bandit/clipped"] = float((w.detach() > clip).float().mean())
    return loss, metrics


def doubly_robust_loss(
    shown_logps: torch.Tensor, propensities: torch.Tensor, rewards: torch.Tensor, class_logps: torch.Tensor,
    shown: torch.Tensor, reward_estimates: torch.Tensor, clip: float = 10.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Doubly robust estimate of π_θ's reward (Dudík, Langford & Li 2011), negated; the
    correction's weight clipped at M:

        V̂_DR = (1/N) Σ_i [ Σ_a π_θ(a|x_i) r̂(x_i, a) + min(w_i, M) · (r_i − r̂(x_i, a_i)) ]
        L    = −V̂_DR

    ``class_logps`` (N, K) log π_θ(·|x_i) over all K classes (with gradient), ``shown`` (N,) the
    index a_i, ``reward_estimates`` r̂ (N, K) in [0, 1]: a model of P(the user says correct | x, a),
    fixed (no gradient), e.g. the logging classifier's own probabilities. The first term (the
    direct method) gives every class a gradient on every row; the second removes its bias
    wherever r̂ is wrong. Unbiased when either r̂ or the propensities are right. It needs the
    whole action set, so it fits classification, not NER entity spans.
    Metrics as :func:`banditnet_loss`, plus ``bandit/direct`` (the direct-method term's mean).
    """
    w = importance_weights(shown_logps, propensities)
    estimates = reward_estimates.float().detach()
    direct = (class_logps.float().exp() * estimates).sum(dim=1)  # (N,)
    shown_estimate = estimates.gather(1, shown.long().unsqueeze(1)).squeeze(1)  # (N,) r̂(x_i, a_i)
    correction = torch.clamp(w, max=clip) * (rewards.float() - shown_estimate)
    loss = -(direct + correction).mean()
    metrics = _bandit_metrics(w, rewards)
    metrics["bandit/direct"] = float(direct.detach().mean())
    return loss, metrics


@dataclass(frozen=True)
class BanditLoss:
    """A bandit objective: one row of :data:`BANDIT_LOSSES`, the table ``classify.bandit_loss`` names.

    ``loss`` takes (shown_logps, propensities, rewards) and the keyword settings named in
    ``settings`` (``classify.<name>`` in the config); with ``needs_classes`` also class_logps,
    shown and reward_estimates (the direct-method term needs every class's probability)."""

    title: str  # its name in logs and reports
    loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    settings: tuple[str, ...]
    needs_classes: bool = False


BANDIT_LOSSES: dict[str, BanditLoss] = {
    "banditnet": BanditLoss("BanditNet (λ-translated IPS)", banditnet_loss, ("translation",)),
    "clipped_ips": BanditLoss("clipped IPS", clipped_ips_loss, ("translation", "clip")),
    "doubly_robust": BanditLoss("doubly robust", doubly_robust_loss, ("clip",), needs_classes=True),
}


def feedback_objective(
    bandit_loss: torch.Tensor,
    label_logps: torch.Tensor,
    named: torch.Tensor,
    supervised_logps: torch.Tensor | None = None,
    alpha: float = 0.0,
    label_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Everything a batch of feedback teaches, as one loss (issue 29's L_CE + α·R):

        L = L_bandit + β · (1/N) Σ_i 1[y_i named] · (−log π_θ(y_i|x_i)) + α · (1/S) Σ_s −log π_θ(y_s|x_s)

    ``bandit_loss``: a :data:`BANDIT_LOSSES` loss over the batch's N feedback rows.
    ``label_logps`` (N,) log π_θ(y_i|x_i) of the right label where the user named one (any value
    elsewhere: masked out), ``named`` (N,) bool. The named-label cross-entropy is summed and divided
    by N, all rows, not by the named ones: a row's weight does not depend on how many other rows
    of its batch happen to have a label, so a batch with one named row does not hand that row the
    weight of the whole bandit term. ``supervised_logps`` (S,) log π_θ(y_s|x_s) on a batch of the
    original labelled set, weighted by α (0 or None: not used). β (``label_weight``) weighs the
    named labels: they come from the predictions users rejected, the hardest rows, and a
    cross-entropy's gradient on a confidently wrong row is far larger than an importance-weighted
    term's (which is scaled by π_θ), so at β = 1 those few rows can dominate the fit.

    Metrics: ``loss/bandit``, ``loss/label_ce`` (mean −log π over named rows, NaN if none),
    ``loss/supervised_ce`` (NaN if none), ``feedback/named`` (share of rows with a named label).
    """
    named = named.bool()
    label_nll = torch.where(named, -label_logps.float(), torch.zeros_like(label_logps, dtype=torch.float32))
    loss = bandit_loss + label_weight * label_nll.sum() / max(named.numel(), 1)
    supervised_ce = float("nan")
    if supervised_logps is not None and supervised_logps.numel() and alpha:
        supervised = -supervised_logps.float().mean()
        loss = loss + alpha * supervised
        supervised_ce = float(supervised.detach())
    n_named = int(named.sum())
    return loss, {
        "loss/bandit": float(bandit_loss.detach()),
        "loss/label_ce": float(label_nll.detach().sum() / n_named) if n_named else float("nan"),
        "loss/supervised_ce": supervised_ce,
        "feedback/named": n_named / max(named.numel(), 1),
    }
