"""Bandit objectives for classifiers (correct / wrong on the shown prediction), checked against
values worked out by hand on two or three logged predictions, and by the direction one gradient
step moves each shown output's probability."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from alignloop.losses import (
    BANDIT_LOSSES,
    banditnet_loss,
    clipped_ips_loss,
    doubly_robust_loss,
    feedback_objective,
    importance_weights,
)

# Three logged predictions: π_θ(shown) = [0.5, 0.2, 0.9], logged with p = [0.5, 0.1, 0.9], so the
# importance weights are w = [1, 2, 1]; the users said correct, wrong, correct.
PI = [0.5, 0.2, 0.9]
P = [0.5, 0.1, 0.9]
R = [1.0, 0.0, 1.0]


def logged(requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(PI).log().requires_grad_(requires_grad), torch.tensor(P), torch.tensor(R)


def test_importance_weights_are_ratios_of_probabilities() -> None:
    assert importance_weights(*logged()[:2]).tolist() == pytest.approx([1.0, 2.0, 1.0], rel=1e-6)


def test_banditnet_loss_and_metrics_match_hand_computation() -> None:
    loss, metrics = banditnet_loss(*logged(), translation=0.25)
    # −(1/3)[(1 − ¼)·1 + (0 − ¼)·2 + (1 − ¼)·1] = −(0.75 − 0.5 + 0.75)/3
    assert loss.item() == pytest.approx(-1 / 3, rel=1e-6)
    assert metrics["bandit/snips"] == pytest.approx((1 + 0 + 1) / (1 + 2 + 1), rel=1e-6)
    assert metrics["bandit/weight_mean"] == pytest.approx(4 / 3, rel=1e-6)
    assert metrics["bandit/weight_max"] == pytest.approx(2.0, rel=1e-6)
    assert metrics["bandit/ess"] == pytest.approx(4**2 / (3 * (1 + 4 + 1)), rel=1e-6)
    assert metrics["bandit/reward"] == pytest.approx(2 / 3, rel=1e-6)


def test_banditnet_gradient_is_minus_translated_reward_times_weight_over_n() -> None:
    logps, p, r = logged(requires_grad=True)
    banditnet_loss(logps, p, r, translation=0.25)[0].backward()
    # ∂L/∂log π_i = −(r_i − λ)·w_i / N
    assert logps.grad.tolist() == pytest.approx([-0.75 / 3, 0.25 * 2 / 3, -0.75 / 3], rel=1e-6)


def test_without_translation_a_wrong_verdict_has_no_gradient() -> None:
    logps, p, r = logged(requires_grad=True)
    banditnet_loss(logps, p, r, translation=0.0)[0].backward()
    assert logps.grad[1].item() == 0.0  # why λ > 0: otherwise "wrong" teaches nothing


def test_translating_the_self_normalised_ratio_changes_only_a_constant() -> None:
    # Σ (r − λ) w / Σ w = SNIPS − λ, whatever λ: the docstring's reason for translating the sum instead
    w = importance_weights(*logged()[:2])
    r = torch.tensor(R)
    snips = (r * w).sum() / w.sum()
    for lam in (0.0, 0.3, 0.9):
        assert float(((r - lam) * w).sum() / w.sum()) == pytest.approx(float(snips) - lam, abs=1e-6)


def test_clipped_ips_caps_the_weight_and_stops_that_rows_gradient() -> None:
    logps, p, r = logged(requires_grad=True)
    loss, metrics = clipped_ips_loss(logps, p, r, translation=0.25, clip=1.5)
    # min(w, 1.5) = [1, 1.5, 1]: −(0.75·1 − 0.25·1.5 + 0.75·1)/3
    assert loss.item() == pytest.approx(-(0.75 - 0.375 + 0.75) / 3, rel=1e-6)
    assert metrics["bandit/clipped"] == pytest.approx(1 / 3)
    loss.backward()
    assert logps.grad.tolist() == pytest.approx([-0.25, 0.0, -0.25], rel=1e-6)


def test_clipped_ips_refuses_a_non_positive_clip() -> None:
    with pytest.raises(ValueError, match="clip must be > 0"):
        clipped_ips_loss(*logged(), clip=0.0)


def test_doubly_robust_matches_hand_computation() -> None:
    # Two rows, two classes. Row 1: π = [0.5, 0.5], shown 0 with p = 0.5, correct, r̂ = [0.6, 0.4].
    # Row 2: π = [0.2, 0.8], shown 0 with p = 0.1, wrong, r̂ = [0.3, 0.7].
    class_logps = torch.tensor([[0.5, 0.5], [0.2, 0.8]]).log()
    shown = torch.tensor([0, 0])
    estimates = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    loss, metrics = doubly_robust_loss(class_logps[:, 0], torch.tensor([0.5, 0.1]), torch.tensor([1.0, 0.0]),
                                       class_logps, shown, estimates, clip=10.0)
    # direct: 0.5·0.6 + 0.5·0.4 = 0.5 and 0.2·0.3 + 0.8·0.7 = 0.62; w = [1, 2];
    # correction: 1·(1 − 0.6) = 0.4 and 2·(0 − 0.3) = −0.6; V = (0.9 + 0.02)/2
    assert loss.item() == pytest.approx(-0.46, rel=1e-6)
    assert metrics["bandit/direct"] == pytest.approx((0.5 + 0.62) / 2, rel=1e-6)


def test_feedback_objective_adds_named_label_and_supervised_cross_entropy() -> None:
    bandit = torch.tensor(0.2)
    label_logps = torch.tensor([0.5, 0.25, 0.9]).log()  # the third row names no label: ignored
    named = torch.tensor([True, True, False])
    supervised = torch.tensor([0.5, 0.5]).log()
    loss, metrics = feedback_objective(bandit, label_logps, named, supervised, alpha=0.5)
    # (log 2 + log 4)/3 over all three rows = log 2; α·CE = 0.5·log 2
    assert loss.item() == pytest.approx(0.2 + math.log(2) + 0.5 * math.log(2), rel=1e-6)
    assert metrics["loss/label_ce"] == pytest.approx(1.5 * math.log(2), rel=1e-6)
    assert metrics["loss/supervised_ce"] == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["feedback/named"] == pytest.approx(2 / 3)
    alone, metrics = feedback_objective(bandit, label_logps, torch.zeros(3, dtype=torch.bool))
    assert alone.item() == pytest.approx(0.2) and math.isnan(metrics["loss/label_ce"])


def one_step(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """π(shown) before and after one SGD step of a table loss on a 3-row, 4-class softmax model."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, requires_grad=True)
    shown = torch.tensor([1, 2, 3])
    propensities, rewards = torch.tensor([0.9, 0.9, 0.025]), torch.tensor([1.0, 0.0, 1.0])
    settings = {"translation": 0.5, "clip": 100.0}

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        class_logps = torch.log_softmax(logits, dim=1)
        shown_logps = class_logps.gather(1, shown[:, None]).squeeze(1)
        bandit = BANDIT_LOSSES[name]
        extra = {}
        if bandit.needs_classes:
            extra = {"class_logps": class_logps, "shown": shown, "reward_estimates": torch.full((3, 4), 0.25)}
        return bandit.loss(shown_logps, propensities, rewards, **extra, **{k: settings[k] for k in bandit.settings})[0]

    before = torch.softmax(logits, dim=1).gather(1, shown[:, None]).squeeze(1).detach()
    loss_of(logits).backward()
    with torch.no_grad():
        after = torch.softmax(logits - 0.1 * logits.grad, dim=1).gather(1, shown[:, None]).squeeze(1)
    return before, after


@pytest.mark.parametrize("name", sorted(BANDIT_LOSSES))
def test_a_step_raises_confirmed_outputs_and_lowers_rejected_ones(name: str) -> None:
    before, after = one_step(name)
    assert after[0] > before[0] and after[2] > before[2]  # correct: more likely
    assert after[1] < before[1]  # wrong: less likely


@pytest.mark.parametrize("name", sorted(BANDIT_LOSSES))
def test_each_table_row_names_settings_its_function_takes(name: str) -> None:
    bandit = BANDIT_LOSSES[name]
    assert set(bandit.settings) <= set(inspect.signature(bandit.loss).parameters)


def test_label_weight_scales_only_the_named_label_term() -> None:
    label_logps = torch.tensor([0.5, 0.25]).log()
    loss, _ = feedback_objective(torch.tensor(0.2), label_logps, torch.tensor([True, False]), label_weight=0.3)
    assert loss.item() == pytest.approx(0.2 + 0.3 * math.log(2) / 2, rel=1e-6)  # one named row of two
