"""Online-RL maths: advantage estimators, KL estimators and controllers, and the policy/value losses,
each checked against numbers worked out by hand (the working is in the comments) on 2×3 tensors.

Padded positions hold deliberately absurd values (99, −50, NaN): a function that reads padding fails.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignloop.advantages import (
    ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    compute_advantages,
    discounted_returns,
    fraction_zero_std_groups,
    gae,
    group_advantages,
    kl_in_reward,
    leave_one_out_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    subtract_group_mean,
    token_rewards,
)
from alignloop.config import PolicyOptimizationConfig
from alignloop.losses import (
    aggregate_token_loss,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    kl_estimate,
)

NAN = float("nan")


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> None:
    expected = expected if isinstance(expected, torch.Tensor) else t(expected)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


MASK = t([[1, 1, 1], [1, 1, 0]])  # row 0 has 3 response tokens, row 1 has 2


# ---- masked statistics ---------------------------------------------------------------------------------------

def test_masked_mean_ignores_padding_overall_and_per_row():
    x = t([[1, 2, 3], [4, 5, NAN]])
    close(masked_mean(x, MASK), 15 / 5)
    close(masked_mean(x, MASK, dim=1), [2.0, 4.5])


def test_masked_var_unbiased_and_biased():
    x = t([[1, 2, 3], [4, 99, 99]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # valid 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    close(masked_var(x, mask), 5 / 3)
    close(masked_var(x, mask, unbiased=False), 5 / 4)


def test_masked_var_refuses_too_few_tokens():
    with pytest.raises(ValueError, match="at least 2 valid"):
        masked_var(t([[1.0, 2.0]]), t([[1, 0]]))


def test_masked_whiten_has_mean_zero_std_one_over_valid_tokens_and_zero_padding():
    x = t([[1, 2, 3], [4, 100, -50]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    out = masked_whiten(x, mask)
    # mean 2.5, unbiased var 5/3: (x − 2.5) / sqrt(5/3) = ±1.1618950, ±0.3872983
    close(out, [[-1.1618950003765403, -0.38729833345884673, 0.38729833345884673], [1.1618950003765403, 0, 0]])
    valid = out[mask.bool()]
    assert abs(float(valid.mean())) < 1e-12
    assert float(valid.std()) == pytest.approx(1.0, abs=1e-8)


def test_masked_whiten_without_shift_keeps_the_mean():
    x = t([[1, 2, 3], [4, 100, -50]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    out = masked_whiten(x, mask, shift_mean=False)
    close(out[mask.bool()], [2.5 - 1.1618950003765403, 2.5 - 0.38729833345884673,
                              2.5 + 0.38729833345884673, 2.5 + 1.1618950003765403])


# ---- per-token rewards, returns, GAE --------------------------------------------------------------------------

def test_token_rewards_put_the_score_on_the_last_valid_token():
    scores = t([1.0, -2.0, 5.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the last row is empty: no token to hold its score
    out = token_rewards(scores, kl, mask, kl_coef=0.5)
    # row 0: −0.5·kl, +1 on t = 2; row 1: −0.5·0.4 − 2 on t = 0, padding 0; row 2: nothing
    close(out, [[-0.05, -0.1, -0.15 + 1.0], [-0.2 - 2.0, 0, 0], [0, 0, 0]])


def test_discounted_returns_per_row():
    rewards = t([[1, 2, 3], [4, 5, 7]])
    # γ = 0.5. Row 0: G2 = 3, G1 = 2 + 0.5·3 = 3.5, G0 = 1 + 0.5·3.5 = 2.75.
    # Row 1 (2 tokens; the 7 is padding): G1 = 5, G0 = 4 + 0.5·5 = 6.5.
    close(discounted_returns(rewards, MASK, gamma=0.5), [[2.75, 3.5, 3.0], [6.5, 5.0, 0.0]])
    close(discounted_returns(rewards, MASK), [[6, 5, 3], [9, 5, 0]])


REWARDS = t([[0.0, 0.0, 1.0], [0.2, -1.0, 5.0]])  # 5.0 and 9.0 are padding
VALUES = t([[0.5, 0.4, 0.6], [0.3, 0.1, 9.0]])


def test_gae_on_rows_of_different_lengths():
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    # γλ = 0.72; V past the last valid token is 0.
    # Row 0: δ2 = 1 − 0.6 = 0.4                 A2 = 0.4
    #        δ1 = 0 + 0.9·0.6 − 0.4 = 0.14      A1 = 0.14 + 0.72·0.4 = 0.428
    #        δ0 = 0 + 0.9·0.4 − 0.5 = −0.14     A0 = −0.14 + 0.72·0.428 = 0.16816
    # Row 1: δ1 = −1 − 0.1 = −1.1               A1 = −1.1
    #        δ0 = 0.2 + 0.9·0.1 − 0.3 = −0.01   A0 = −0.01 + 0.72·(−1.1) = −0.802
    close(advantages, [[0.16816, 0.428, 0.4], [-0.802, -1.1, 0.0]])
    close(returns, [[0.66816, 0.828, 1.0], [-0.502, -1.0, 0.0]])  # A + V, 0 on padding


@pytest.mark.parametrize(
    ("lam", "expected_advantages", "expected_returns"),
    [
        # λ = γ = 1: A = Monte Carlo return − V, and the return is the plain reward-to-go:
        # row 0 [1, 1, 1], row 1 [0.2 − 1, −1] = [−0.8, −1].
        (1.0, [[0.5, 0.6, 0.4], [-1.1, -1.1, 0.0]], [[1.0, 1.0, 1.0], [-0.8, -1.0, 0.0]]),
        # λ = 0: the one-step TD error δ_t = r_t + V_{t+1} − V_t; the return is r_t + V_{t+1}.
        (0.0, [[-0.1, 0.2, 0.4], [0.0, -1.1, 0.0]], [[0.4, 0.6, 1.0], [0.3, -1.0, 0.0]]),
    ],
)
def test_gae_limits(lam, expected_advantages, expected_returns):
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=lam)
    close(advantages, expected_advantages)
    close(returns, expected_returns)


def test_gae_with_lambda_one_equals_discounted_returns_minus_values():
    advantages, _ = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=1.0)
    close(advantages, (discounted_returns(REWARDS, MASK, gamma=0.9) - VALUES) * MASK)


def test_estimators_return_constants():
    values = VALUES.clone().requires_grad_(True)
    advantages, returns = gae(REWARDS, values, MASK, gamma=1.0, lam=0.95)
    assert not advantages.requires_grad and not returns.requires_grad


# ---- group baselines ----------------------------------------------------------------------------------------

GROUPED = t([1, 0, 0, 1, 2, 2, 2, 5])  # two prompts, four samples each


@pytest.mark.parametrize(
    ("scale_by_std", "expected"),
    [
        # group 1: mean 0.5, unbiased std sqrt(1/3) = 0.5773503 → ±0.5 / (0.5773503 + 1e-4) = ±0.8658754
        # group 2: mean 2.75, unbiased std sqrt(6.75/3) = 1.5 → −0.75 / 1.5001, 2.25 / 1.5001
        (True, [0.8658754297607016, -0.8658754297607016, -0.8658754297607016, 0.8658754297607016,
                -0.49996666888874075, -0.49996666888874075, -0.49996666888874075, 1.4999000066662223]),
        (False, [0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25]),  # Dr. GRPO: centred only
    ],
)
def test_group_advantages(scale_by_std, expected):
    close(group_advantages(GROUPED, group_size=4, scale_by_std=scale_by_std), expected)


def test_group_advantages_of_a_tied_group_are_zero():
    close(group_advantages(t([3, 3, 3, 0, 1, 2]), group_size=3)[:3], [0, 0, 0])


def test_leave_one_out_advantages():
    # group 1: a 1 sees the others' mean (0 + 0 + 1)/3 = 1/3, a 0 sees (1 + 0 + 1)/3 = 2/3
    # group 2: a 2 sees (2 + 2 + 5)/3 = 3, the 5 sees 2
    close(leave_one_out_advantages(GROUPED, group_size=4),
          [2 / 3, -2 / 3, -2 / 3, 2 / 3, -1, -1, -1, 3])


def test_subtract_group_mean():
    # group 1: mean 0.5; group 2: mean 2.75
    close(subtract_group_mean(GROUPED, group_size=4), [0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25])


def test_fraction_zero_std_groups():
    rewards = t([1, 1, 1, 0, 1, 0, 2, 2, 2, 3, 3, 4])
    assert fraction_zero_std_groups(rewards, group_size=3) == 0.5


@pytest.mark.parametrize("estimator", [group_advantages, leave_one_out_advantages, fraction_zero_std_groups,
                                       subtract_group_mean])
@pytest.mark.parametrize(
    ("rewards", "group_size", "message"),
    [
        (t([1, 2, 3, 4]), 1, "group_size must be ≥ 2"),
        (t([1, 2, 3, 4, 5]), 2, "multiple of group_size"),
        (t([[1, 2], [3, 4]]), 2, r"shape \(B,\)"),
    ],
)
def test_group_estimators_refuse_bad_groups(estimator, rewards, group_size, message):
    with pytest.raises(ValueError, match=message):
        estimator(rewards, group_size)


# ---- one estimator per algorithm: the ESTIMATORS table -------------------------------------------------------

SCORES = t([1.0, 0.0])  # two completions of one prompt, rows of MASK
ROLLOUT_KL = t([[0.3, 0.1, 0.2], [0.4, 0.2, 99.0]])  # k1 per token; 99 is padding
# β = 0.5 and the KL in the reward: each score less β · its mean per-token KL
# row 0: 1 − 0.5 · 0.6 / 3 = 0.9;  row 1: 0 − 0.5 · 0.6 / 2 = −0.15
# Per token (reinforce, ppo) with the group's mean 0.5 subtracted first: r_t = −0.5 · k1_t / L (+ s − 0.5 last)
# row 0: [−0.05, −1/60, −1/30 + 0.5]  → reward-to-go (γ = 1) [0.4, 0.45, 0.4 + 1/15]
# row 1: [−0.1, −0.05 − 0.5]          → [−0.65, −0.55]
SHAPED_RETURNS = t([[0.4, 0.45, 0.4 + 1 / 15], [-0.65, -0.55, 0.0]])


def rl_settings(algo: str, **overrides) -> PolicyOptimizationConfig:
    return PolicyOptimizationConfig(algo=algo, group_size=2, **overrides)


@pytest.mark.parametrize(("algo", "overrides", "expected"), [
    ("rloo", {}, [1.05, -1.05]),  # 0.9 − (−0.15) and back
    ("grpo", {}, [0.5 / (0.5 ** 0.5 + 1e-4), -0.5 / (0.5 ** 0.5 + 1e-4)]),  # KL in the loss: plain scores, std √0.5
    ("grpo", {"kl_in_reward": True}, [0.525 / (1.05 / 2 ** 0.5 + 1e-4), -0.525 / (1.05 / 2 ** 0.5 + 1e-4)]),
    ("grpo", {"scale_rewards": False}, [0.5, -0.5]),
])
def test_sequence_level_estimators(algo, overrides, expected):
    advantages, returns = compute_advantages(rl_settings(algo, **overrides), SCORES, MASK, ROLLOUT_KL, 0.5, None)
    close(advantages, expected)
    assert returns is None


def test_reinforce_whitens_the_returns_of_the_kl_shaped_token_rewards():
    advantages, returns = compute_advantages(rl_settings("reinforce"), SCORES, MASK, ROLLOUT_KL, 0.5, None)
    close(advantages, masked_whiten(SHAPED_RETURNS, MASK))
    assert returns is None


def test_ppo_whitens_gae_and_returns_the_critics_targets():
    # λ = γ = 1: A_t = G_t − V_t, and the critic's target is G_t
    advantages, returns = compute_advantages(rl_settings("ppo"), SCORES, MASK, ROLLOUT_KL, 0.5, VALUES)
    close(returns, SHAPED_RETURNS)
    close(advantages, masked_whiten((SHAPED_RETURNS - VALUES) * MASK, MASK))


@pytest.mark.parametrize("beta, rollout_kl", [(0.0, ROLLOUT_KL), (0.5, None)])
def test_no_kl_in_the_reward_without_a_reference_or_a_weight(beta, rollout_kl):
    advantages, _ = compute_advantages(rl_settings("rloo"), SCORES, MASK, rollout_kl, beta, None)
    close(advantages, [1.0, -1.0])


def test_kl_in_reward_is_the_algorithms_default_unless_set():
    assert [kl_in_reward(rl_settings(algo)) for algo in ("ppo", "grpo", "rloo", "reinforce")] == [True, False, True, True]
    assert kl_in_reward(rl_settings("grpo", kl_in_reward=True))
    assert not kl_in_reward(rl_settings("ppo", kl_in_reward=False))


@pytest.mark.parametrize("algo", list(ESTIMATORS))
def test_every_estimator_returns_the_critics_targets_exactly_when_it_uses_a_critic(algo):
    estimator = ESTIMATORS[algo]
    advantages, returns = estimator.estimate(SCORES, MASK, None, 0.0, VALUES, rl_settings(algo))
    assert advantages.shape in ((2,), (2, 3))
    assert (returns is not None) == estimator.uses_critic


# ---- KL estimators and controllers ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("k1", [0.5, -1.0]),  # log π − log π_ref
        ("k2", [0.125, 0.5]),  # ½ (log π − log π_ref)²
        ("k3", [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]),  # r = log π_ref − log π = −0.5, 1
    ],
)
def test_kl_estimators_by_hand(kind, expected):
    logprobs, ref_logprobs = t([-1.0, -2.0]), t([-1.5, -1.0])
    close(kl_estimate(logprobs, ref_logprobs, kind), expected)


def test_k3_is_never_negative_and_zero_when_policies_agree():
    torch.manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(4, 50) * 5, -torch.rand(4, 50) * 5
    assert bool((kl_estimate(logprobs, ref_logprobs, "k3") >= 0).all())
    close(kl_estimate(t([[-0.3, -2.0]]), t([[-0.3, -2.0]]), "k3"), [[0.0, 0.0]])


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_unbiased_kl_estimators_average_to_the_exact_kl(kind):
    pi, ref = t([0.7, 0.2, 0.1]), t([0.4, 0.4, 0.2])
    exact = float((pi * (pi / ref).log()).sum())  # 0.1838…
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=generator)
    estimate = kl_estimate(pi.log()[samples], ref.log()[samples], kind).mean()
    assert float(estimate) == pytest.approx(exact, abs=0.01)


def test_unknown_kl_estimator_names_the_choices():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(t([0.0]), t([0.0]), "k4")


@pytest.mark.parametrize(
    ("kl", "expected"),
    [
        (12.0, 0.1 * (1 + 0.2 * 0.1)),  # error +1 clipped to +0.2; n_steps / horizon = 0.1
        (6.6, 0.1 * (1 + 0.1 * 0.1)),  # error +0.1
        (6.0, 0.1),  # on target
        (5.4, 0.1 * (1 - 0.1 * 0.1)),  # error −0.1
        (0.0, 0.1 * (1 - 0.2 * 0.1)),  # error −1 clipped to −0.2
    ],
)
def test_adaptive_kl_controller_moves_towards_the_target_by_at_most_20_percent(kl, expected):
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    controller.update(kl, n_steps=1_000)
    assert controller.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_kl_controller_resumes_exactly_from_its_state_dict():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    for kl in (9.0, 7.0, 2.0):
        controller.update(kl, n_steps=256)
    state = json.loads(json.dumps(controller.state_dict()))  # as a checkpoint would store it
    resumed = AdaptiveKLController(0.5, target=1.0, horizon=5)
    resumed.load_state_dict(state)
    assert (resumed.value, resumed.target, resumed.horizon) == (controller.value, 6.0, 10_000)
    controller.update(8.0, n_steps=256)
    resumed.update(8.0, n_steps=256)
    assert resumed.value == controller.value


def test_adaptive_kl_controller_refuses_a_non_positive_target():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10_000)


def test_fixed_kl_controller_never_moves_and_round_trips():
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=10_000)
    assert controller.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert other.value == 0.05


# ---- aggregation ---------------------------------------------------------------------------------------------

PER_TOKEN = t([[1, 2, 3], [4, NAN, NAN]])  # NaN padding must not leak
ROW_MASK = t([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "max_tokens", "expected"),
    [
        ("token", None, (1 + 2 + 3 + 4) / 4),  # every token equal
        ("sequence", None, (2 + 4) / 2),  # row means 2 and 4, then their mean
        ("dr_grpo", None, 10 / (2 * 3)),  # B · T
        ("dr_grpo", 5, 10 / (2 * 5)),  # B · max_tokens
    ],
)
def test_aggregate_token_loss(mode, max_tokens, expected):
    close(aggregate_token_loss(PER_TOKEN, ROW_MASK, mode, max_tokens), expected)


def test_unknown_aggregation_names_the_choices():
    with pytest.raises(ValueError, match="token, sequence, dr_grpo"):
        aggregate_token_loss(PER_TOKEN, ROW_MASK, "mean")


# ---- policy loss ---------------------------------------------------------------------------------------------

def policy_inputs(ratios):
    old = t([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    return (old + t(ratios).log()).requires_grad_(True), old


# Rows: A = +1 then A = −1; each row one token where the clip binds and one where it does not; the third
# token is padding with a ratio of 3.
#   row 0, ρ = 1.5, A = +1: max(−1.5, −1.2) = −1.2   clipped
#   row 0, ρ = 0.5, A = +1: max(−0.5, −0.8) = −0.5   not clipped (the pessimistic bound is the ratio)
#   row 1, ρ = 0.5, A = −1: max( 0.5,  0.8) =  0.8   clipped
#   row 1, ρ = 1.5, A = −1: max( 1.5,  1.2) =  1.5   not clipped
MIXED_RATIOS = [[1.5, 0.5, 3.0], [0.5, 1.5, 3.0]]
PAIR_MASK = t([[1, 1, 0], [1, 1, 0]])


@pytest.mark.parametrize("advantages", [t([1.0, -1.0]), t([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])], ids=["B", "BxT"])
def test_clipped_policy_loss_by_hand(advantages):
    logprobs, old = policy_inputs(MIXED_RATIOS)
    loss, metrics = clipped_policy_loss(logprobs, old, advantages, PAIR_MASK)
    close(loss, (-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert metrics["clip_fraction"] == 0.5
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    # (ρ − 1) − log ρ: 0.5 − log 1.5 = 0.0945349 twice, −0.5 − log 0.5 = 0.1931472 twice
    assert metrics["approx_kl"] == pytest.approx((0.09453489189183562 + 0.1931471805599453) / 2)
    # Only unclipped tokens carry gradient: d(−A·ρ)/d log π = −A·ρ, divided by the 4 tokens.
    loss.backward()
    close(logprobs.grad, [[0.0, -0.5 / 4, 0.0], [0.0, 1.5 / 4, 0.0]])


def test_clipped_policy_loss_without_clipping_is_the_plain_surrogate():
    logprobs, old = policy_inputs([[1.1, 0.9, 3.0], [1.0, 1.05, 3.0]])
    loss, metrics = clipped_policy_loss(logprobs, old, t([2.0, -1.0]), PAIR_MASK)
    close(loss, (-2.0 * 1.1 - 2.0 * 0.9 + 1.0 + 1.05) / 4)
    assert metrics["clip_fraction"] == 0.0


@pytest.mark.parametrize(
    ("clip_high", "expected_loss", "expected_clip_fraction"),
    [
        # ρ = 1.25, A = +1: clipped at 1.2 by default; clip-higher 0.28 lets it through.
        # ρ = 0.7, A = −1: the lower bound 0.8 binds either way: max(0.7, 0.8) = 0.8.
        (None, (-1.2 + 0.8) / 2, 1.0),
        (0.28, (-1.25 + 0.8) / 2, 0.5),
    ],
)
def test_clip_higher_widens_only_the_upper_bound(clip_high, expected_loss, expected_clip_fraction):
    old = t([[-1.0], [-1.0]])
    logprobs = old + t([[1.25], [0.7]]).log()
    loss, metrics = clipped_policy_loss(logprobs, old, t([1.0, -1.0]), t([[1], [1]]), clip_low=0.2,
                                        clip_high=clip_high)
    close(loss, expected_loss)
    assert metrics["clip_fraction"] == expected_clip_fraction


def test_clipped_policy_loss_passes_the_aggregation_through():
    logprobs, old = policy_inputs([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    advantages = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])  # ρ = 1: the loss is −A
    loss, _ = clipped_policy_loss(logprobs, old, advantages, mask, aggregation="sequence")
    close(loss, -(2.0 + 4.0) / 2)
    loss, _ = clipped_policy_loss(logprobs, old, advantages, mask, aggregation="dr_grpo", max_tokens=4)
    close(loss, -10.0 / 8)


# ---- value loss, explained variance, entropy ---------------------------------------------------------------

def test_clipped_value_loss_by_hand():
    values = t([[1.0, 0.6, 2.0, 3.0, 50.0]])
    old_values = t([[0.5, 0.5, 0.0, 0.0, 0.0]])
    returns = t([[2.0, 0.0, 0.0, 3.0, -50.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, metrics = clipped_value_loss(values, old_values, returns, mask, clip=0.2)
    # t0: (1 − 2)² = 1, clipped V 0.7: (0.7 − 2)² = 1.69 → ½·1.69 = 0.845   clipped
    # t1: (0.6 − 0)² = 0.36, V within the clip: the same 0.36 → 0.18      not clipped (a tie)
    # t2: (2 − 0)² = 4, clipped V 0.2: 0.04 → ½·4 = 2                     not clipped
    # t3: (3 − 3)² = 0, clipped V 0.2: 2.8² = 7.84 → ½·7.84 = 3.92        clipped (a jump to R is held back)
    close(loss, (0.845 + 0.18 + 2.0 + 3.92) / 4)
    assert metrics["value_clip_fraction"] == 0.5


RETURNS = t([[1, 2, 3], [4, 77, 77]])
EV_MASK = t([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (RETURNS, 1.0),  # perfect critic
        (torch.full((2, 3), 2.5, dtype=torch.float64), 0.0),  # the mean of the valid returns
        # residuals 0, 0, 0, 1: Var 0.1875; Var[R] = 1.25 → 1 − 0.15
        (t([[1, 2, 3], [3, 0, 0]]), 0.85),
    ],
)
def test_explained_variance(values, expected):
    assert explained_variance(values, RETURNS, EV_MASK) == pytest.approx(expected, abs=1e-12)


def test_explained_variance_of_constant_returns_is_nan():
    assert math.isnan(explained_variance(t([[0.0, 1.0]]), t([[2.0, 2.0]]), t([[1, 1]])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_entropy_of_uniform_logits_is_log_vocab(dtype, offset):
    logits = torch.full((2, 3, 7), offset, dtype=dtype)
    entropy = entropy_from_logits(logits)
    assert entropy.dtype == torch.float32 and entropy.shape == (2, 3)
    torch.testing.assert_close(entropy, torch.full((2, 3), math.log(7)))


def test_entropy_by_hand_and_with_banned_tokens():
    # p = (1/4, 3/4): −(¼ log ¼ + ¾ log ¾) = 0.5623351; a −inf logit is p = 0 and adds nothing
    logits = torch.tensor([[[0.0, math.log(3.0), -math.inf], [5.0, -math.inf, -math.inf]]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[0.5623351446188083, 0.0]]))
