"""Offline preference losses (DPO and variants, SimPO, RPO's NLL term, KTO) and the per-sequence
log-probabilities they take, checked against values worked out by hand on two to four examples.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignloop.losses import PAIR_LOSSES, dpo_loss, kto_loss, kto_reference_point, rpo_nll, sequence_logps, simpo_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# Three pairs. Log-ratios π − ref: chosen [0.5, 0, 0.5], rejected [−0.5, 0.5, 0];
# h = [1.0, −0.5, 0.5]: the policy prefers the chosen more than the reference does on pairs 1 and 3.
POLICY_CHOSEN = [-10.0, -12.0, -8.0]
POLICY_REJECTED = [-11.0, -11.0, -9.0]
REF_CHOSEN = [-10.5, -12.0, -8.5]
REF_REJECTED = [-10.5, -11.5, -9.0]
H = [1.0, -0.5, 0.5]


def pairs(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    tensors = [torch.tensor(v) for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)]
    tensors[0].requires_grad_(requires_grad)
    tensors[1].requires_grad_(requires_grad)
    return tuple(tensors)


# ---------------------------------------------------------------------------------------------
# DPO and variants
# ---------------------------------------------------------------------------------------------
def test_dpo_sigmoid_loss_and_metrics_match_hand_computation() -> None:
    loss, metrics = dpo_loss(*pairs(), beta=0.1)
    # βh = [0.1, −0.05, 0.05]
    assert loss.item() == pytest.approx(-mean([log_sigmoid(0.1), log_sigmoid(-0.05), log_sigmoid(0.05)]), rel=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(0.1 * (0.5 + 0 + 0.5) / 3, rel=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(0.1 * (-0.5 + 0.5 + 0) / 3, abs=1e-7)
    assert metrics["rewards/margin"] == pytest.approx(0.1 * (1.0 - 0.5 + 0.5) / 3, rel=1e-6)
    assert metrics["rewards/accuracy"] == pytest.approx(2 / 3)  # pair 2 has h < 0
    assert metrics["logps/chosen"] == pytest.approx(-10.0)
    assert metrics["logps/rejected"] == pytest.approx(-31 / 3)
    assert all(isinstance(value, float) for value in metrics.values())


def test_accuracy_counts_a_tie_as_a_miss_and_beta_scales_rewards() -> None:
    # h = [2, 0]: one win, one tie
    policy_chosen, policy_rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0])
    zeros = torch.zeros(2)
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, zeros, zeros, beta=0.5)
    assert metrics["rewards/accuracy"] == 0.5
    assert metrics["rewards/chosen"] == pytest.approx(0.5 * (-1 - 2) / 2)
    assert metrics["rewards/rejected"] == pytest.approx(0.5 * (-3 - 2) / 2)
    assert metrics["rewards/margin"] == pytest.approx(0.5 * (2 + 0) / 2)
    assert loss.item() == pytest.approx(-(log_sigmoid(1.0) + math.log(0.5)) / 2, rel=1e-6)


def test_label_smoothed_sigmoid_is_cdpo() -> None:
    loss, _ = dpo_loss(*pairs(), beta=1.0, label_smoothing=0.1)
    # βh = [1, −0.5, 0.5]; ℓ = −0.9 log σ(βh) − 0.1 log σ(−βh)
    expected = mean([-0.9 * log_sigmoid(x) - 0.1 * log_sigmoid(-x) for x in (1.0, -0.5, 0.5)])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_robust_dpo_matches_hand_computation_and_differs_from_cdpo() -> None:
    robust, metrics = dpo_loss(*pairs(), beta=1.0, loss_type="robust", label_smoothing=0.1)
    expected = mean([(-0.9 * log_sigmoid(x) + 0.1 * log_sigmoid(-x)) / 0.8 for x in (1.0, -0.5, 0.5)])
    assert robust.item() == pytest.approx(expected, rel=1e-6)
    cdpo, _ = dpo_loss(*pairs(), beta=1.0, label_smoothing=0.1)
    assert robust.item() != pytest.approx(cdpo.item(), rel=1e-3)
    assert metrics["rewards/margin"] == pytest.approx(1.0 / 3, rel=1e-6)  # metrics do not depend on the variant

    # with ε = 0 all three sigmoid forms are plain DPO
    plain, _ = dpo_loss(*pairs(), beta=1.0)
    robust_0, _ = dpo_loss(*pairs(), beta=1.0, loss_type="robust")
    assert plain.item() == pytest.approx(-mean([log_sigmoid(x) for x in (1.0, -0.5, 0.5)]), rel=1e-6)
    assert robust_0.item() == pytest.approx(plain.item(), rel=1e-6)


def test_robust_dpo_is_unbiased_under_label_flips_and_unbounded_below() -> None:
    # (1 − ε)·L_rob(h) + ε·L_rob(−h) = −log σ(βh): in expectation over flips, the clean loss
    h, zeros = torch.tensor([0.7]), torch.zeros(1)
    flipped, _ = dpo_loss(zeros, h, zeros, zeros, beta=1.0, loss_type="robust", label_smoothing=0.2)
    clean, _ = dpo_loss(h, zeros, zeros, zeros, beta=1.0, loss_type="robust", label_smoothing=0.2)
    assert (0.8 * clean + 0.2 * flipped).item() == pytest.approx(-log_sigmoid(0.7), rel=1e-6)
    big = torch.tensor([20.0])
    robust, _ = dpo_loss(big, zeros, zeros, zeros, beta=1.0, loss_type="robust", label_smoothing=0.2)
    assert robust.item() == pytest.approx((-0.8 * log_sigmoid(20) + 0.2 * log_sigmoid(-20)) / 0.6, rel=1e-6)
    assert robust.item() < 0


def test_ipo_loss_uses_beta_as_tau_unless_ipo_tau_is_given() -> None:
    loss, metrics = dpo_loss(*pairs(), beta=0.5, loss_type="ipo")
    # 1/(2τ) = 1: (h − 1)² = [0, 2.25, 0.25]
    assert loss.item() == pytest.approx((0 + 2.25 + 0.25) / 3, rel=1e-6)
    assert metrics["rewards/margin"] == pytest.approx(0.5 * 1.0 / 3, rel=1e-6)
    loss, metrics = dpo_loss(*pairs(), beta=0.5, loss_type="ipo", ipo_tau=0.25)
    # 1/(2τ) = 2: (h − 2)² = [1, 6.25, 2.25]; rewards still scaled by β
    assert loss.item() == pytest.approx((1 + 6.25 + 2.25) / 3, rel=1e-6)
    assert metrics["rewards/margin"] == pytest.approx(0.5 * 1.0 / 3, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"loss_type": "robust", "label_smoothing": 0.1}, {"loss_type": "ipo"}],
    ids=["sigmoid", "robust", "ipo"],
)
def test_dpo_gradient_raises_chosen_and_lowers_rejected(kwargs: dict) -> None:
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = pairs(requires_grad=True)
    loss, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, **kwargs)
    loss.backward()
    # IPO with τ = 0.1 targets h = 5, above every h here, so it pushes the same way
    assert (policy_chosen.grad < 0).all()  # raising a chosen log-prob lowers the loss
    assert (policy_rejected.grad > 0).all()
    # sigmoid DPO: ∂L/∂π_c = −β σ(−βh) / N
    if not kwargs:
        expected = [-0.1 * sigmoid(-0.1 * h) / 3 for h in H]
        assert policy_chosen.grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_cdpo_stops_pushing_past_its_soft_target_and_robust_does_not() -> None:
    # cDPO's gradient in βh vanishes at log((1−ε)/ε) = log 9 ≈ 2.2; beyond it, it pulls h back
    zeros = torch.zeros(1)
    for loss_type, sign in (("sigmoid", 1), ("robust", -1)):
        chosen = torch.tensor([3.0], requires_grad=True)
        loss, _ = dpo_loss(chosen, zeros, zeros, zeros, beta=1.0, loss_type=loss_type, label_smoothing=0.1)
        loss.backward()
        assert sign * chosen.grad.item() > 0, loss_type


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_every_pair_loss_of_the_table_pushes_the_chosen_side_up(name: str) -> None:
    """Each row of PAIR_LOSSES (what `preference.loss` names), called the way the trainer calls it:
    descending its gradient raises the chosen completions' log-probs and lowers the rejected ones'."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = pairs(requires_grad=True)
    lengths = torch.tensor([4.0, 5.0, 3.0])
    pair_loss = PAIR_LOSSES[name]
    if pair_loss.uses_reference:
        loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.1, name)
    else:
        loss, metrics = pair_loss.reference_free(policy_chosen, policy_rejected, lengths, lengths, 0.1, 0.1)
    loss.backward()
    assert pair_loss.title and math.isfinite(float(loss.detach())) and "rewards/margin" in metrics
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "hinge"}, "sigmoid, robust, ipo"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing < 0.5"),
        ({"label_smoothing": -0.1}, "≥ 0"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "no effect on loss_type 'ipo'"),
        ({"ipo_tau": 0.1}, "only applies to loss_type 'ipo'"),
        ({"loss_type": "ipo", "beta": 0.0}, "τ > 0"),
    ],
)
def test_dpo_refuses_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dpo_loss(*pairs(), **kwargs)


# ---------------------------------------------------------------------------------------------
# SimPO and the RPO term
# ---------------------------------------------------------------------------------------------
CHOSEN_LENGTHS = [5, 4, 8]
REJECTED_LENGTHS = [11, 2, 3]


def test_simpo_normalises_by_length_and_subtracts_gamma() -> None:
    loss, metrics = simpo_loss(torch.tensor(POLICY_CHOSEN), torch.tensor(POLICY_REJECTED),
                               torch.tensor(CHOSEN_LENGTHS), torch.tensor(REJECTED_LENGTHS), beta=2.0, gamma=0.5)
    # r_c = 2·[−10/5, −12/4, −8/8] = [−4, −6, −2]; r_r = 2·[−11/11, −11/2, −9/3] = [−2, −11, −6]
    # r_c − r_r = [−2, 5, 4]; minus γ: [−2.5, 4.5, 3.5]
    assert loss.item() == pytest.approx(-mean([log_sigmoid(-2.5), log_sigmoid(4.5), log_sigmoid(3.5)]), rel=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(-4.0)
    assert metrics["rewards/rejected"] == pytest.approx(-19 / 3)
    assert metrics["rewards/margin"] == pytest.approx(7 / 3)  # without γ
    assert metrics["rewards/accuracy"] == pytest.approx(2 / 3)
    assert metrics["logps/chosen"] == pytest.approx(-10.0)
    assert metrics["logps/rejected"] == pytest.approx(-31 / 3)


def test_simpo_gradient_sign_and_empty_completion() -> None:
    chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    loss, _ = simpo_loss(chosen, torch.tensor(POLICY_REJECTED), torch.tensor(CHOSEN_LENGTHS),
                         torch.tensor(REJECTED_LENGTHS))
    loss.backward()
    assert (chosen.grad < 0).all()
    with pytest.raises(ValueError, match=r"rejected_lengths has completions with no tokens at rows \[1\]"):
        simpo_loss(chosen, chosen, torch.tensor(CHOSEN_LENGTHS), torch.tensor([3, 0, 1]))


def test_rpo_nll_is_the_mean_per_token_nll_of_the_chosen() -> None:
    # −[−10/5, −12/4, −8/8] = [2, 3, 1]
    assert rpo_nll(torch.tensor(POLICY_CHOSEN), torch.tensor(CHOSEN_LENGTHS)).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no tokens"):
        rpo_nll(torch.tensor(POLICY_CHOSEN), torch.tensor([1, 0, 2]))


# ---------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------
def test_kto_loss_weights_each_class_around_the_reference_point() -> None:
    policy = torch.tensor([-5.0, -6.0, -7.0, -8.0], requires_grad=True)
    ref = torch.tensor([-6.0, -6.0, -6.0, -9.0])
    desirable = torch.tensor([True, False, True, False])
    loss, metrics = kto_loss(policy, ref, desirable, kl_reference=0.5, beta=0.5,
                             desirable_weight=2.0, undesirable_weight=1.0)
    # r = [1, 0, −1, 1]; desirable: 2·(1 − σ(0.5·(r − 0.5))), undesirable: 1 − σ(0.5·(0.5 − r))
    expected = (2 * (1 - sigmoid(0.25)) + (1 - sigmoid(0.25)) + 2 * (1 - sigmoid(-0.75)) + (1 - sigmoid(-0.25))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(0.0, abs=1e-7)  # 0.5·mean(1, −1)
    assert metrics["rewards/rejected"] == pytest.approx(0.25)  # 0.5·mean(0, 1)
    assert metrics["rewards/margin"] == pytest.approx(-0.25)
    assert metrics["kl"] == 0.5
    assert metrics["logps/chosen"] == pytest.approx(-6.0)
    assert metrics["logps/rejected"] == pytest.approx(-7.0)
    loss.backward()
    # desirable completions are pushed up, undesirable ones down
    assert policy.grad[0] < 0 and policy.grad[2] < 0
    assert policy.grad[1] > 0 and policy.grad[3] > 0


def test_kto_metrics_are_nan_for_a_missing_class() -> None:
    loss, metrics = kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0]), torch.tensor([True, True]),
                             kl_reference=0.0, beta=1.0)
    # r = [0, −1]: (1 − σ(0) + 1 − σ(−1)) / 2
    assert loss.item() == pytest.approx((0.5 + 1 - sigmoid(-1)) / 2, rel=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(-0.5)
    assert math.isnan(metrics["rewards/rejected"]) and math.isnan(metrics["rewards/margin"])
    assert math.isnan(metrics["logps/rejected"])


def test_kto_reference_point_is_the_mismatched_mean_log_ratio_clamped_at_zero() -> None:
    assert kto_reference_point(torch.tensor([-5.0, -6.0]), torch.tensor([-6.0, -6.0])) == pytest.approx(0.5)
    assert kto_reference_point(torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -5.0])) == 0.0  # mean −0.5
    z0 = kto_reference_point(torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0]))
    assert isinstance(z0, float) and z0 == 1.0


# ---------------------------------------------------------------------------------------------
# Per-sequence log-probabilities
# ---------------------------------------------------------------------------------------------
def test_sequence_logps_sums_shifted_completion_tokens() -> None:
    logits = torch.tensor(
        [
            [[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [2.0, 1.0, 1.0], [0.0, 1.0, 0.0]],
            [[0.5, 0.0, -1.0], [1.0, 1.0, 1.0], [0.0, 2.0, 0.0], [9.0, 9.0, 9.0]],
        ]
    )
    # row 0: prompt token, then completion tokens 1, 0, 2; row 1: prompt, tokens 2, 1, then padding
    labels = torch.tensor([[-100, 1, 0, 2], [-100, 2, 1, -100]])

    def logp(row: list[float], k: int) -> float:
        return row[k] - math.log(sum(math.exp(z) for z in row))

    rows = logits.tolist()
    # label at t is predicted by the logits at t − 1
    expected_0 = logp(rows[0][0], 1) + logp(rows[0][1], 0) + logp(rows[0][2], 2)
    expected_1 = logp(rows[1][0], 2) + logp(rows[1][1], 1)
    summed, counts = sequence_logps(logits, labels)
    assert summed.tolist() == pytest.approx([expected_0, expected_1], rel=1e-6)
    assert counts.tolist() == [3, 2]
    assert summed.dtype == torch.float32


def test_sequence_logps_is_stable_in_half_precision_and_has_gradient() -> None:
    logits = torch.tensor([[[1000.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.bfloat16, requires_grad=True)
    summed, counts = sequence_logps(logits, torch.tensor([[-100, 1]]))
    # log softmax([1000, 0, 0])[1] = −1000 − log(1 + 2e−1000) = −1000
    assert summed.dtype == torch.float32 and summed.item() == pytest.approx(-1000.0)
    assert counts.tolist() == [1]
    summed.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # nothing labelled: sum 0 over 0 tokens
    summed, counts = sequence_logps(torch.zeros(1, 3, 4), torch.full((1, 3), -100))
    assert summed.tolist() == [0.0] and counts.tolist() == [0]
