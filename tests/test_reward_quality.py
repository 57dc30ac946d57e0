"""Reward-model quality: accuracy, calibration and length bias checked on hand-computed pairs, on a
synthetic set calibrated by construction, and the report files written from them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from scipy.stats import rankdata

from alignloop.report.reward_quality import pair_quality, reward_verdict, write_reward_report
from alignloop.report.stats import spearman, wilson_interval

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# Six pairs, margins m = r_c − r_r = 2, 0, −1, 3, 0.5, 1.
CHOSEN = [2.0, 1.0, 0.0, 3.0, 0.5, 1.0]
REJECTED = [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
CHOSEN_LEN = [10, 30, 5, 40, 25, 8]
REJECTED_LEN = [20, 30, 15, 10, 12, 9]  # chosen shorter: pairs 1, 3, 6; equal: 2; longer: 4, 5
GROUPS = ["b", "a", "b", "a", "b", "a"]


def test_hand_computed_pairs() -> None:
    q = pair_quality(CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN, bins=5)
    # correct per pair: 1, ½ (tie), 0, 1, 1, 1 → accuracy 4.5 / 6 = 0.75
    assert q["pairs"] == 6 and q["ties"] == 1
    assert q["accuracy"] == pytest.approx(0.75, abs=1e-9)
    assert q["margin_mean"] == pytest.approx(5.5 / 6, abs=1e-9)
    # confidence σ(|m|) and bin (5 bins of width 0.1 over [0.5, 1]):
    #   m=0   → 0.5      bin 0, correct ½
    #   m=0.5 → 0.622459 bin 1, correct 1  → |1 − 0.622459| = 0.377541
    #   m=−1  → 0.731059 bin 2, correct 0 ┐ acc ½, conf 0.731059 → 0.231059, weight 2
    #   m=1   → 0.731059 bin 2, correct 1 ┘
    #   m=2   → 0.880797 bin 3, correct 1  → 0.119203
    #   m=3   → 0.952574 bin 4, correct 1  → 0.047426
    # ECE = (0 + 0.377541 + 2·0.231059 + 0.119203 + 0.047426) / 6 = 1.006288 / 6 = 0.167715
    ece = (0 + (1 - sig(0.5)) + 2 * abs(0.5 - sig(1)) + (1 - sig(2)) + (1 - sig(3))) / 6
    assert ece == pytest.approx(0.167715, abs=1e-6)
    assert q["ece"] == pytest.approx(ece, abs=1e-9)
    assert [b["count"] for b in q["reliability"]] == [1, 1, 2, 1, 1]
    assert q["reliability"][2]["accuracy"] == pytest.approx(0.5, abs=1e-9)
    assert q["reliability"][2]["mean_confidence"] == pytest.approx(sig(1), abs=1e-9)
    # Brier (1 − σ(m))² = σ(−m)²: 0.014209 + 0.25 + 0.534447 + 0.002249 + 0.142537 + 0.072329 = 1.015772 → /6
    margins = [2.0, 0.0, -1.0, 3.0, 0.5, 1.0]
    brier = sum(sig(-m) ** 2 for m in margins) / 6
    assert brier == pytest.approx(0.169295, abs=1e-6)
    assert q["brier"] == pytest.approx(brier, abs=1e-9)
    # log loss log(1 + e^{−m}): 0.126928 + 0.693147 + 1.313262 + 0.048587 + 0.474077 + 0.313262 = 2.969263 → /6
    log_loss = sum(math.log1p(math.exp(-m)) for m in margins) / 6
    assert log_loss == pytest.approx(0.494877, abs=1e-6)
    assert q["log_loss"] == pytest.approx(log_loss, abs=1e-9)
    # chosen shorter: pairs 1, 3, 6 → correct 1, 0, 1 → 2/3; longer: pairs 4, 5 → 1, 1
    assert q["pairs_chosen_shorter"] == 3 and q["accuracy_chosen_shorter"] == pytest.approx(2 / 3, abs=1e-9)
    assert q["pairs_chosen_longer"] == 2 and q["accuracy_chosen_longer"] == pytest.approx(1.0, abs=1e-9)
    # "longer wins": chosen longer in 2 pairs, equal in 1 → (2 + ½) / 6
    assert q["longer_wins_baseline"] == pytest.approx(2.5 / 6, abs=1e-9)
    assert q["chosen_mean"] == pytest.approx(7.5 / 6, abs=1e-9)
    assert q["rejected_std"] == pytest.approx(float(np.std(REJECTED)), abs=1e-9)
    assert "per_group" not in q


def test_ties_count_half() -> None:
    q = pair_quality([1.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1, 2, 3, 4], [2, 1, 3, 3])
    assert q["ties"] == 2
    assert q["accuracy"] == pytest.approx((0.5 + 0.5 + 1 + 0) / 4, abs=1e-9)
    # a tie has p = ½: confidence 0.5, half correct, so it adds nothing to the ECE of the first bin
    assert q["reliability"][0]["count"] == 2 and q["reliability"][0]["accuracy"] == pytest.approx(0.5)


def test_wilson_interval_known_value() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    q = pair_quality([1.0] * 8 + [0.0] * 2, [0.0] * 8 + [1.0] * 2, [1] * 10, [1] * 10)
    assert q["accuracy_ci"] == pytest.approx([lo, hi], abs=1e-12)


def test_constant_lengths_give_no_correlation() -> None:
    q = pair_quality(CHOSEN, REJECTED, [7] * 6, [7] * 6)
    assert q["length_reward_corr"] is None
    assert q["length_reward_spearman"] is None
    assert q["length_margin_corr"] is None
    assert q["accuracy_chosen_shorter"] is None and q["pairs_chosen_shorter"] == 0
    assert q["longer_wins_baseline"] == pytest.approx(0.5)
    json.dumps(q, allow_nan=False)  # None, not NaN


def test_length_correlations_hand_computed() -> None:
    # lengths 1..4 with rewards rising in length: Pearson and Spearman 1 over the pooled responses
    q = pair_quality([3.0, 4.0], [1.0, 2.0], [3, 4], [1, 2])
    assert q["length_reward_corr"] == pytest.approx(1.0, abs=1e-12)
    assert q["length_reward_spearman"] == pytest.approx(1.0, abs=1e-12)
    # ties share the mean rank; x ranks [1, 2.5, 2.5, 4], y ranks [1, 3, 2, 4]
    # ρ = Σ centred products / √(Σx² Σy²) = 4.5 / √(4.5 · 5) = 0.948683
    assert rankdata(np.array([1, 2, 2, 3])).tolist() == [1.0, 2.5, 2.5, 4.0]  # the ranks spearman uses
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 3, 2, 4])) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)


def test_per_group() -> None:
    q = pair_quality(CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN, groups=GROUPS)
    assert list(q["per_group"]) == ["a", "b"]
    # a: pairs 2, 4, 6 → ½, 1, 1 = 2.5/3; b: pairs 1, 3, 5 → 1, 0, 1 = 2/3
    assert q["per_group"]["a"]["pairs"] == 3
    assert q["per_group"]["a"]["accuracy"] == pytest.approx(2.5 / 3, abs=1e-9)
    assert q["per_group"]["a"]["accuracy_ci"] == pytest.approx(wilson_interval(2.5, 3), abs=1e-12)
    assert q["per_group"]["b"]["accuracy"] == pytest.approx(2 / 3, abs=1e-9)
    with pytest.raises(ValueError, match="one label per pair"):
        pair_quality(CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN, groups=["a"])


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="same length"):
        pair_quality([1.0, 2.0], [0.0], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="empty"):
        pair_quality([], [], [], [])
    with pytest.raises(ValueError, match="chosen has 1 non-finite"):
        pair_quality([float("nan")], [0.0], [1], [1])


def calibrated_pairs(scale: float) -> tuple[list[float], list[float]]:
    """20k pairs whose true P(chosen wins) is σ(margin), then the margins multiplied by ``scale``.

    Draw m, draw the winner from σ(m), and orient the pair so the winner is "chosen": its margin is
    m when the first response won and −m otherwise. At scale 1 the BT probabilities are exact.
    """
    rng = np.random.default_rng(0)
    m = rng.normal(0.0, 2.0, size=20_000)
    first_wins = rng.random(m.shape) < 1.0 / (1.0 + np.exp(-m))
    margins = np.where(first_wins, m, -m) * scale
    return margins.tolist(), [0.0] * len(margins)


def test_calibrated_set_has_small_ece_and_sharpened_set_is_over_confident() -> None:
    lengths = [1] * 20_000
    q = pair_quality(*calibrated_pairs(1.0), lengths, lengths)
    assert q["ece"] < 0.02
    sharp = pair_quality(*calibrated_pairs(5.0), lengths, lengths)
    assert sharp["ece"] > 0.1
    assert sharp["mean_confidence"] > sharp["accuracy"]
    assert sharp["accuracy"] == q["accuracy"]  # scaling margins changes confidence, never the ranking
    assert "over-confident" in reward_verdict(sharp)
    assert "well calibrated" in reward_verdict(q)
    assert "under-confident" in reward_verdict(pair_quality(*calibrated_pairs(0.2), lengths, lengths))


def test_verdict_warns_about_length_bias() -> None:
    # reward = length: longer always wins, so every pair whose chosen is shorter is wrong
    chosen_len, rejected_len = [10, 20, 5, 40], [20, 10, 30, 5]
    q = pair_quality([float(x) for x in chosen_len], [float(x) for x in rejected_len], chosen_len, rejected_len)
    assert q["length_reward_corr"] == pytest.approx(1.0)
    assert q["accuracy_chosen_shorter"] == 0.0
    verdict = reward_verdict(q)
    assert "Length bias" in verdict and "Pearson +1.00" in verdict and "drops to 0.00" in verdict
    assert "write longer" in verdict
    # reward = −length: the bias runs the other way, and the verdict says so
    q = pair_quality([-float(x) for x in chosen_len], [-float(x) for x in rejected_len], chosen_len, rejected_len)
    assert "Pearson -1.00" in reward_verdict(q) and "write shorter" in reward_verdict(q)


@pytest.mark.parametrize("groups", [None, GROUPS])
def test_write_reward_report(tmp_path: Path, groups: list[str] | None) -> None:
    q = pair_quality(CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN, groups=groups, bins=5)
    report = write_reward_report(tmp_path / "rm", q, CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN, "tiny RM",
                                 notes="Scored on the held-out split.")
    folder = tmp_path / "rm"
    assert report == folder / "report.md"
    assert json.loads((folder / "metrics.json").read_text()) == q
    pngs = ["reliability.png", "scores.png", "length_vs_reward.png"] + (["per_group.png"] if groups else [])
    for name in pngs:
        data = (folder / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), name
        assert f"]({name})" in report.read_text()
    assert (folder / "per_group.png").exists() == (groups is not None)
    text = report.read_text()
    assert text.startswith("# tiny RM: reward model quality")
    assert "Accuracy 0.75 [" in text and "`ece` | 0.168 |" in text
    assert text.rstrip().endswith("Scored on the held-out split.")
    assert ("| a | 3 | 0.833 |" in text) == (groups is not None)
