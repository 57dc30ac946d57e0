"""Advantage estimators for online RL: small pure functions of tensors, checkable by hand.

Shapes: B sequences (rollouts), T response tokens. ``mask`` (B, T) is 1 (or True) on real response
tokens and 0 on the padding after EOS; response tokens are left-aligned, so each row of the mask
reads 1…1 0…0. Values at padded positions are never read: they may hold anything, NaN included.

The estimators (:func:`gae`, :func:`discounted_returns`, :func:`token_rewards`,
:func:`group_advantages`, :func:`leave_one_out_advantages`) return constants: they run under
``torch.no_grad`` because an advantage or a return is a target of the update, not something to
differentiate. The ``masked_*`` statistics keep the graph, so a loss may use them.

Which algorithm uses which (one row each in :data:`ESTIMATORS`, which the trainer reads):

    PPO          token_rewards (score + KL penalty) → gae → masked_whiten(advantages)
    GRPO         group_advantages (one advantage per sequence, broadcast over its tokens)
    Dr. GRPO     group_advantages(scale_by_std=False)
    RLOO         leave_one_out_advantages
    REINFORCE++  token_rewards → discounted_returns(gamma=1) → masked_whiten over the batch

A new algorithm is an estimator function with :data:`Estimate`'s signature and one row of
:data:`ESTIMATORS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from alignloop.config import PolicyOptimizationConfig


# ---- masked statistics over valid tokens ----------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

        mean = Σ_{b,t} m_bt · x_bt / Σ_{b,t} m_bt          (dim=None: one number over all valid tokens)
        mean_b = Σ_t m_bt · x_bt / Σ_t m_bt                 (dim=1: one per row)

    NaN when there are no valid positions (0/0): an empty batch has no mean.
    """
    mask = mask.to(x.dtype)
    total = torch.where(mask > 0, x, torch.zeros_like(x)) * mask  # where: padding may be NaN or inf
    if dim is None:
        return total.sum() / mask.sum()
    return total.sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid positions (N = Σ m).

        var = Σ m·(x − mean)² / (N − 1)      unbiased (Bessel's correction), the default
        var = Σ m·(x − mean)² / N            unbiased=False

    Raises ValueError when N = 0, or N = 1 with ``unbiased``: there is no spread to estimate.
    """
    n = float(mask.sum())
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid token(s), got {n:g}; "
                         "check that the mask marks the response tokens")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to mean 0 and std 1 over all valid tokens of the batch; padding becomes 0.

        x̂ = (x − mean) / sqrt(var + ε)          mean, var (unbiased) over valid tokens: masked_mean, masked_var
        x̂ = (x − mean) / sqrt(var + ε) + mean   shift_mean=False: rescale only, keep the mean (PPO's
                                                 value-target whitening in TRL)

    Padded positions are excluded from the statistics and set to 0 in the result, so a later
    masked sum never reads them.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---- per-token rewards and returns ----------------------------------------------------------------------------

@torch.no_grad()
def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards with the KL penalty folded in ("KL in the reward").

        r_bt = −β · kl_bt + [t = last valid token of row b] · s_b      on valid tokens, 0 on padding

    ``scores`` s (B,): one reward-model score per sequence; ``kl`` (B, T): a per-token KL estimate
    against the reference policy (``losses.kl_estimate``, usually k1); ``kl_coef`` β (a float, e.g.
    ``AdaptiveKLController.value``). A row with no valid token gets no reward.
    Used by PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022, Eq. 2) and REINFORCE++ (Hu 2025).
    """
    valid = mask.bool()
    rewards = torch.where(valid, -kl_coef * kl, torch.zeros_like(kl))
    positions = torch.arange(mask.size(1), device=mask.device)
    last = torch.where(valid, positions, -1).max(dim=1).values  # (B,) index of the last valid token, −1 if none
    has_tokens = last >= 0
    rows = torch.arange(mask.size(0), device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards


@torch.no_grad()
def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted reward-to-go over each row's valid tokens (B, T).

        G_t = Σ_{s ≥ t, s valid} γ^{s−t} r_s  =  r_t + γ · G_{t+1}      (G = 0 past the last valid token)

    REINFORCE++ (Hu 2025) uses this with γ = 1 on :func:`token_rewards`, then
    :func:`masked_whiten` over the batch as the advantage. Padding gets 0.
    """
    valid = mask.bool()
    rewards = torch.where(valid, token_rewards, torch.zeros_like(token_rewards))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = torch.where(valid[:, t], rewards[:, t] + gamma * running, torch.zeros_like(running))
        returns[:, t] = running
    return returns


@torch.no_grad()
def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, Eq. 16), per token: ``(advantages, returns)``.

        δ_t = r_t + γ · V_{t+1} − V_t          V_{t+1} = 0 past the last valid token (the episode ends)
        A_t = δ_t + γλ · A_{t+1}  =  Σ_{l ≥ 0} (γλ)^l δ_{t+l}
        R_t = A_t + V_t                         the value target (TD(λ) return)

    ``token_rewards`` r (B, T), e.g. from :func:`token_rewards`; ``values`` V (B, T), the critic's
    value at each response token. Rows may have different lengths; padding gets A = R = 0.
    λ = 1 gives A_t = Σ_{s≥t} γ^{s−t} r_s − V_t (Monte Carlo); λ = 0 gives the one-step δ_t.
    Used by PPO (Schulman et al. 2017; Ouyang et al. 2022).
    """
    valid = mask.bool()
    zeros = torch.zeros_like(values)
    rewards = torch.where(valid, token_rewards, zeros)
    values = torch.where(valid, values, zeros)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):  # padding has V = A = 0, so a row ends where its mask does
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, zeros[:, t])
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, torch.where(valid, advantages + values, zeros)


# ---- group baselines: several samples per prompt ------------------------------------------------------------

def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rewards`` (B,) as (B / k, k): consecutive runs of k samples of the same prompt."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one score per sequence, shape (B,), got {tuple(rewards.shape)}")
    if group_size < 2:
        # one sample per prompt has no group to compare with: every advantage would be 0, a silent no-op
        raise ValueError(f"group_size must be ≥ 2 samples per prompt, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}; "
                         "B must be a multiple of group_size (prompts × samples per prompt)")
    return rewards.view(-1, group_size)


@torch.no_grad()
def subtract_group_mean(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each reward minus the mean reward of its prompt's group (B,): a baseline that needs no critic.

        r̃_i = r_i − mean_g = r_i − (1 / k) · Σ_{j ∈ g} r_j

    ``rewards`` (B,) as consecutive groups of ``group_size`` k samples of one prompt. GRPO's
    advantage before its division by the group's std; PPO and REINFORCE++ subtract it from the
    scores when a prompt is sampled several times.
    """
    groups = _groups(rewards, group_size)
    return (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantage of each sequence (B,): GRPO (Shao et al. 2024, §4.1.2).

        A_i = (r_i − mean_g) / (std_g + ε)       std_g unbiased over the k samples of the group (as TRL)
        A_i =  r_i − mean_g                      scale_by_std=False: Dr. GRPO (Liu et al. 2025)

    ``rewards`` (B,) as consecutive groups of ``group_size`` k samples of one prompt. A group whose
    rewards are all equal gets A = 0 (see :func:`fraction_zero_std_groups`).
    """
    centred = subtract_group_mean(rewards, group_size)
    if not scale_by_std:
        return centred
    groups = _groups(rewards, group_size)
    return (centred.view_as(groups) / (groups.std(dim=1, keepdim=True) + eps)).reshape(-1)


@torch.no_grad()
def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantage of each sequence (B,) (Ahmadian et al. 2024): the baseline is the others' mean.

        A_i = r_i − (1 / (k − 1)) · Σ_{j ≠ i} r_j  =  k / (k − 1) · (r_i − mean_g)

    ``rewards`` (B,) as consecutive groups of ``group_size`` k samples of one prompt.
    """
    groups = _groups(rewards, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def fraction_zero_std_groups(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose k rewards are all equal: GRPO's dead batches.

    Such a group has A = 0 for every sample and teaches nothing (DAPO's dynamic sampling drops them);
    a value near 1 means the task is too easy or too hard for the current policy.
    """
    groups = _groups(rewards, group_size)
    return float((groups.amax(dim=1) == groups.amin(dim=1)).float().mean())


# ---- one estimator per algorithm --------------------------------------------------------------------------------

Estimate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float, torch.Tensor | None, PolicyOptimizationConfig],
                    tuple[torch.Tensor, torch.Tensor | None]]
"""``estimate(scores, mask, kl, kl_coef, values, settings) -> (advantages, returns)``: ``scores`` s (B,)
one reward per completion; ``mask`` (B, T); ``kl`` (B, T) k1 = log π_old − log π_ref per token to
fold into the reward with weight ``kl_coef`` β, or None when the KL is not in the reward;
``values`` (B, T) the critic's V_t (None without one); ``settings`` the ``rl`` config section.
Advantages are (B,) per completion or (B, T) per token; returns (B, T) are the critic's targets, or
None without a critic."""


def _kl_in_score(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, kl_coef: float) -> torch.Tensor:
    """s_i − β · (1 / L_i) · Σ_t k1_it: each score less β times its completion's *mean* per-token KL
    (L_i its length), so the penalty does not grow with length; ``scores`` unchanged when ``kl`` is None."""
    if kl is None:
        return scores
    return scores - kl_coef * (kl * mask).sum(1) / mask.sum(1).clamp_min(1)


def _kl_in_tokens(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, kl_coef: float,
                  group_size: int) -> torch.Tensor:
    """Per-token rewards (B, T) for the token-level estimators (:func:`token_rewards`):

        r_t = −β · k1_t / L  (+ s̃ on the last token)       s̃ = s − mean_g (k > 1, :func:`subtract_group_mean`), else s

    The KL term is divided by the completion's length L so a whole completion's penalty is β times
    its mean per-token KL, as for the sequence-level estimators; no KL term when ``kl`` is None.
    """
    if group_size > 1:  # several samples per prompt: the prompt's mean reward is a free baseline
        scores = subtract_group_mean(scores, group_size)
    if kl is None:
        return token_rewards(scores, torch.zeros_like(mask), mask, 0.0)
    return token_rewards(scores, kl / mask.sum(1).clamp_min(1)[:, None], mask, kl_coef)


def ppo_advantages(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, kl_coef: float,
                   values: torch.Tensor | None, settings: PolicyOptimizationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO (Schulman et al. 2017; Ouyang et al. 2022): GAE on the per-token rewards, whitened over the batch.

        r_t from :func:`_kl_in_tokens`;   (A_t, R_t) = gae(r, V, γ, λ);   A_t ← masked_whiten(A_t)

    R_t, the value head's target, is returned with the advantages.
    """
    advantages, returns = gae(_kl_in_tokens(scores, mask, kl, kl_coef, settings.group_size), values, mask,
                              settings.gamma, settings.lam)
    return masked_whiten(advantages, mask), returns


def grpo_advantages(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, kl_coef: float,
                    values: torch.Tensor | None, settings: PolicyOptimizationConfig) -> tuple[torch.Tensor, None]:
    """GRPO (Shao et al. 2024): A_i = (s_i − mean_g) / (std_g + ε), one per completion (:func:`group_advantages`);
    s_i less β · its mean KL when the KL is in the reward (:func:`_kl_in_score`); ``scale_rewards=False``: Dr. GRPO."""
    return group_advantages(_kl_in_score(scores, mask, kl, kl_coef), settings.group_size,
                            scale_by_std=settings.scale_rewards), None


def rloo_advantages(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, kl_coef: float,
                    values: torch.Tensor | None, settings: PolicyOptimizationConfig) -> tuple[torch.Tensor, None]:
    """RLOO (Ahmadian et al. 2024): A_i = s_i − mean of the others of its group (:func:`leave_one_out_advantages`);
    s_i less β · its mean KL when the KL is in the reward (:func:`_kl_in_score`)."""
    return leave_one_out_advantages(_kl_in_score(scores, mask, kl, kl_coef), settings.group_size), None


def reinforce_advantages(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, kl_coef: float,
                         values: torch.Tensor | None, settings: PolicyOptimizationConfig) -> tuple[torch.Tensor, None]:
    """REINFORCE++ (Hu 2025): the reward-to-go of the per-token rewards, whitened over the batch.

        r_t from :func:`_kl_in_tokens`;   A_t = masked_whiten(G_t),  G_t = Σ_{s ≥ t} γ^{s−t} r_s
    """
    returns = discounted_returns(_kl_in_tokens(scores, mask, kl, kl_coef, settings.group_size), mask, settings.gamma)
    return masked_whiten(returns, mask), None


@dataclass(frozen=True)
class Estimator:
    """An algorithm's advantage estimator and the facts its trainer needs."""

    estimate: Estimate
    title: str  # the algorithm's name in logs and reports
    uses_critic: bool  # reads V_t from a value head and returns its targets R_t (PPO)
    compares_group: bool  # baselines a completion on the others of its prompt: needs rl.group_size ≥ 2
    kl_in_reward: bool  # the default of rl.kl_in_reward: −β·KL in the reward (true) or a KL loss term (false)


ESTIMATORS: dict[str, Estimator] = {
    "ppo": Estimator(ppo_advantages, "PPO", uses_critic=True, compares_group=False, kl_in_reward=True),
    # GRPO adds the KL to the loss rather than the reward, "avoiding complicating the calculation of
    # the advantage" (Shao et al. 2024, §4.1).
    "grpo": Estimator(grpo_advantages, "GRPO", uses_critic=False, compares_group=True, kl_in_reward=False),
    "rloo": Estimator(rloo_advantages, "RLOO", uses_critic=False, compares_group=True, kl_in_reward=True),
    "reinforce": Estimator(reinforce_advantages, "REINFORCE++", uses_critic=False, compares_group=False, kl_in_reward=True),
}


def kl_in_reward(settings: PolicyOptimizationConfig) -> bool:
    """Whether −β·KL goes into the reward (else into the loss): ``rl.kl_in_reward``, or the algorithm's default."""
    return ESTIMATORS[settings.algo].kl_in_reward if settings.kl_in_reward is None else settings.kl_in_reward


def compute_advantages(settings: PolicyOptimizationConfig, scores: torch.Tensor, mask: torch.Tensor,
                       rollout_kl: torch.Tensor | None, kl_coef: float,
                       values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Advantages (B,) or (B, T) for ``settings.algo`` and, with a critic, its returns (B, T).

    ``rollout_kl`` (B, T) k1 per token at rollout time (None without a reference) goes into the
    reward when :func:`kl_in_reward` and β = ``kl_coef`` > 0.
    """
    in_reward = rollout_kl is not None and kl_in_reward(settings) and kl_coef > 0
    return ESTIMATORS[settings.algo].estimate(scores, mask, rollout_kl if in_reward else None, kl_coef, values, settings)


# ---- KL coefficient controllers ---------------------------------------------------------------------------------

class AdaptiveKLController:
    """Adaptive KL coefficient β (Ziegler et al. 2019): steer the measured KL towards a target.

        e = clip(KL / KL_target − 1, −0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)

    ``n_steps`` is how many samples (or steps, in the caller's unit) the measured KL covers;
    ``horizon`` sets how fast β moves. The 20% clip keeps one bad batch from swinging β.
    ``state_dict`` holds plain floats (JSON-safe) so a resumed run continues with the same β.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


class FixedKLController:
    """A constant KL coefficient β with :class:`AdaptiveKLController`'s interface; ``update`` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
