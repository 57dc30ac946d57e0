"""Candidate-vs-baseline statistics: win rates and their intervals, KL estimators, diversity, the gate
and the report, each checked on a handful of hand-computed prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from alignloop.errors import ConfigError
from alignloop.evaluate.compare import (
    METRIC_KEYS,
    completion_metrics,
    distinct_n,
    flatten_metrics,
    kl_summary,
    plot_win_rate,
    repetition_rate,
    write_comparison_report,
)
from alignloop.evaluate.gates import Condition, check_gate, parse_gate
from alignloop.report.plots import plot_length_vs_reward, plot_reward_distributions, plot_run_curves
from alignloop.report.stats import judge_outcomes, length_stats, reward_length_correlation, reward_summary, win_rate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIX_TWO_TWO = [1] * 6 + [0] * 2 + [-1] * 2  # 6 wins, 2 ties, 2 losses


# ---- win rate ------------------------------------------------------------------------------------------------

def test_win_rate_wilson_by_hand() -> None:
    w = win_rate(SIX_TWO_TWO)
    # (6 + ½·2) / 10 = 0.7. Wilson with p̂ = 0.7, n = 10, z = 1.959964, z² = 3.841459:
    #   denom  = 1 + z²/n = 1.384146
    #   centre = (0.7 + z²/2n) / denom = (0.7 + 0.192073) / 1.384146 = 0.644493
    #   half   = z / denom · √(p̂(1−p̂)/n + z²/4n²) = 1.416008 · √(0.021 + 0.009604) = 0.247716
    #   → [0.396778, 0.892209]
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (6, 2, 2, 10)
    assert w["win_rate"] == pytest.approx(0.7, abs=1e-12)
    assert w["win_rate_lower"] == pytest.approx(0.396778, abs=1e-6)
    assert w["win_rate_upper"] == pytest.approx(0.892209, abs=1e-6)
    assert w["win_rate_excluding_ties"] == pytest.approx(6 / 8, abs=1e-12)
    assert w["tie_rate"] == pytest.approx(0.2, abs=1e-12)
    assert w["ci_method"] == "wilson" and w["confidence"] == 0.95
    json.dumps(w)  # plain Python types only


def test_win_rate_confidence_widens_the_interval() -> None:
    w90, w99 = win_rate(SIX_TWO_TWO, confidence=0.90), win_rate(SIX_TWO_TWO, confidence=0.99)
    assert w99["win_rate_lower"] < win_rate(SIX_TWO_TWO)["win_rate_lower"] < w90["win_rate_lower"]


def test_win_rate_bootstrap_contains_estimate_and_is_seeded() -> None:
    outcomes = [1] * 30 + [0] * 10 + [-1] * 20  # (30 + 5) / 60 = 0.5833
    a = win_rate(outcomes, ci="bootstrap", seed=3)
    assert a["win_rate"] == pytest.approx(35 / 60, abs=1e-12)
    assert a["win_rate_lower"] < a["win_rate"] < a["win_rate_upper"]
    assert a == win_rate(outcomes, ci="bootstrap", seed=3)
    # 2000 resamples: the percentile interval lands near the Wilson one (±1.96·√(p(1−p)/n) ≈ ±0.12 here)
    wilson = win_rate(outcomes)
    assert a["win_rate_lower"] == pytest.approx(wilson["win_rate_lower"], abs=0.03)
    assert a["win_rate_upper"] == pytest.approx(wilson["win_rate_upper"], abs=0.03)
    json.dumps(a)


def test_all_ties() -> None:
    w = win_rate([0] * 10)
    # Wilson at p̂ = ½, n = 10: centre ½, half = 1.416008 · √(0.025 + 0.009604) = 0.263407
    assert w["win_rate"] == 0.5 and w["tie_rate"] == 1.0
    assert w["win_rate_lower"] == pytest.approx(0.236593, abs=1e-6)
    assert w["win_rate_upper"] == pytest.approx(0.763407, abs=1e-6)
    assert w["win_rate_excluding_ties"] is None
    b = win_rate([0] * 10, ci="bootstrap")
    assert b["win_rate_lower"] <= 0.5 <= b["win_rate_upper"]


@pytest.mark.parametrize(("outcomes", "kwargs", "match"), [
    ([], {}, "non-empty"),
    ([1, 2, -1], {}, "prompt 1"),
    ([1, 0], {"ci": "normal"}, "wilson' or 'bootstrap"),
    ([1, 0], {"confidence": 1.0}, "confidence"),
])
def test_win_rate_rejects(outcomes: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        win_rate(outcomes, **kwargs)


def test_judge_outcomes() -> None:
    assert judge_outcomes([1.0, 0.5, 0.2, 3.0], [0.0, 0.5, 0.9, 3.05]) == [1, 0, -1, -1]
    assert judge_outcomes([1.0, 0.5, 0.2, 3.0], [0.0, 0.5, 0.9, 3.05], epsilon=0.1) == [1, 0, -1, 0]
    with pytest.raises(ValueError, match="one per prompt"):
        judge_outcomes([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="≥ 0"):
        judge_outcomes([1.0], [1.0], epsilon=-0.1)


# ---- KL -----------------------------------------------------------------------------------------------------

def test_kl_of_identical_logprobs_is_zero() -> None:
    logps = [[-1.0, -2.5, -0.1], [-0.7]]
    kl = kl_summary(logps, logps)
    for key in ("kl_mean", "kl_std", "kl_per_token", "kl_k3_mean", "kl_k3_per_token"):
        assert kl[key] == 0.0, key
    assert kl["kl_sequences"] == 2 and kl["kl_tokens"] == 4


def test_kl_two_sequences_by_hand() -> None:
    candidate = [[-1.0, -2.0], [-0.5]]
    baseline = [[-2.0, -2.5], [-0.25]]
    kl = kl_summary(candidate, baseline)
    # k1 per sequence Σ (log π_c − log π_b): (1 + 0.5) = 1.5 and −0.25
    assert kl["kl_mean"] == pytest.approx((1.5 - 0.25) / 2, abs=1e-12)  # 0.625
    assert kl["kl_std"] == pytest.approx(0.875, abs=1e-12)  # |1.5 − (−0.25)| / 2
    assert kl["kl_per_token"] == pytest.approx(1.25 / 3, abs=1e-12)
    # k3 = e^r − 1 − r, r = log π_b − log π_c = −1, −0.5 | 0.25:
    #   0.367879 + 0.106531 = 0.474410 | 0.034025 → mean 0.254218, per token 0.508436 / 3 = 0.169479
    assert kl["kl_k3_mean"] == pytest.approx(0.254218, abs=1e-6)
    assert kl["kl_k3_per_token"] == pytest.approx(0.169479, abs=1e-6)
    assert kl["kl_k3_per_token"] >= 0.0


def test_kl_rejects_mismatch_and_logits() -> None:
    with pytest.raises(ValueError, match="sequence 0"):
        kl_summary([[-1.0, -1.0]], [[-1.0]])
    with pytest.raises(ValueError, match="not logits"):
        kl_summary([[2.3]], [[-1.0]])
    with pytest.raises(ValueError, match="2 sequences"):
        kl_summary([[-1.0], [-1.0]], [[-1.0]])


def test_kl_empty_sequences_have_no_per_token_value() -> None:
    kl = kl_summary([[]], [[]])
    assert kl["kl_mean"] == 0.0 and kl["kl_per_token"] is None and kl["kl_k3_per_token"] is None


# ---- lengths, diversity, rewards ----------------------------------------------------------------------------

def test_distinct_n_by_hand() -> None:
    texts = ["a b a b", "a b c"]
    # words: a b a b | a b c → 7 words, 3 distinct
    assert distinct_n(texts, 1) == pytest.approx(3 / 7, abs=1e-12)
    # bigrams: (a b) (b a) (a b) | (a b) (b c) → 5, distinct {ab, ba, bc} = 3; none across the boundary
    assert distinct_n(texts, 2) == pytest.approx(0.6, abs=1e-12)
    assert distinct_n(["a b"], 3) is None
    with pytest.raises(ValueError, match="positive integer"):
        distinct_n(texts, 0)


def test_repetition_rate_by_hand() -> None:
    # "a b a b" repeats (a b); "a b c" does not; "x" is too short to repeat
    assert repetition_rate(["a b a b", "a b c", "x"], n=2) == pytest.approx(1 / 3, abs=1e-12)
    loop = "the cat sat on the mat the cat sat on the mat"
    assert repetition_rate([loop, "one two three four five"]) == 0.5  # default n = 4
    assert repetition_rate([]) is None


def test_length_and_reward_summaries() -> None:
    s = length_stats([10, 20, 30, 40, 50])
    assert s == pytest.approx({"mean": 30.0, "median": 30.0, "p10": 14.0, "p90": 46.0, "max": 50.0,
                               "std": math.sqrt(200.0)})
    r = reward_summary([1.0, -1.0, 3.0])
    assert r == pytest.approx({"mean": 1.0, "std": math.sqrt(8 / 3), "median": 1.0, "min": -1.0, "max": 3.0, "n": 3})
    corr = reward_length_correlation([1.0, 2.0, 4.0], [10, 20, 30])
    assert corr["spearman"] == pytest.approx(1.0) and 0.9 < corr["pearson"] < 1.0
    assert reward_length_correlation([1.0, 1.0], [3, 5]) == {"pearson": None, "spearman": None}
    with pytest.raises(ValueError, match="non-finite"):
        reward_summary([1.0, float("nan")])


# ---- flat metrics and the gate ------------------------------------------------------------------------------

def evaluation_metrics() -> dict:
    """A small evaluation: 10 prompts, 6 wins, 2 ties, 2 losses."""
    cand_texts = ["a b c d e f", "yes yes yes yes yes yes", "g h i"] + ["x y"] * 7
    base_texts = ["a b", "c d", "e f"] + ["x"] * 7
    candidate = completion_metrics([1.0, 2.0, 0.5] + [1.0] * 7, [6, 6, 3] + [2] * 7, cand_texts, ppl=12.5)
    baseline = completion_metrics([0.5, 0.5, 0.5] + [0.5] * 7, [2, 2, 2] + [1] * 7, base_texts)
    kl = kl_summary([[-1.0, -2.0], [-0.5]], [[-2.0, -2.5], [-0.25]])
    return flatten_metrics(candidate, baseline, win_rate(SIX_TWO_TWO), kl)


def test_flatten_metrics_keys() -> None:
    m = evaluation_metrics()
    assert m["reward_delta"] == pytest.approx(1.05 - 0.5, abs=1e-12)
    assert m["length_delta"] == pytest.approx(2.9 - 1.3, abs=1e-12)
    assert m["prompts"] == 10 and m["win_rate"] == pytest.approx(0.7)
    assert m["candidate_ppl"] == 12.5 and "baseline_ppl" not in m
    assert m["candidate_repetition_4"] == pytest.approx(0.1)  # "yes" × 6 repeats a 4-gram
    assert set(m) <= METRIC_KEYS
    assert METRIC_KEYS - set(m) == {"baseline_ppl"}
    json.dumps(m)


def test_parse_gate() -> None:
    conditions = parse_gate("win_rate_lower>0.5, kl_per_token<0.1,reward_delta>=0,candidate_ppl<=1e2,ties==-1.5")
    assert conditions == [
        Condition("win_rate_lower", ">", 0.5),
        Condition("kl_per_token", "<", 0.1),
        Condition("reward_delta", ">=", 0.0),
        Condition("candidate_ppl", "<=", 100.0),
        Condition("ties", "==", -1.5),
    ]


@pytest.mark.parametrize(("text", "bad"), [
    ("win_rate", "clause 1 'win_rate'"),
    ("win_rate>>0.5", "'win_rate>>0.5'"),
    ("win_rate>abc", "'win_rate>abc'"),
    ("win_rate=0.5", "'win_rate=0.5'"),
    (">0.5", "'>0.5'"),
    ("win rate>0.5", "'win rate>0.5'"),
    ("win_rate>0.5,", "clause 2 ''"),
    ("win_rate>0.5;kl<1", "'win_rate>0.5;kl<1'"),
    ("  ", "empty gate"),
])
def test_parse_gate_rejects(text: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=bad):
        parse_gate(text)


def test_parse_gate_refuses_unknown_metric_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean 'win_rate_lower'"):
        parse_gate("win_rate_lowr>0.5", known=METRIC_KEYS)
    assert parse_gate("win_rate_lower>0.5", known=METRIC_KEYS)


def test_check_gate_reasons() -> None:
    metrics = {"win_rate_lower": 0.53, "kl_per_token": 0.31, "reward_delta": 0.0, "win_rate_excluding_ties": None}
    passed, reasons = check_gate(parse_gate("win_rate_lower>0.5,reward_delta>=0"), metrics)
    assert passed and reasons == ["win_rate_lower 0.53 > 0.5 ✓", "reward_delta 0 ≥ 0 ✓"]

    passed, reasons = check_gate(parse_gate("win_rate_lower>0.5,kl_per_token<0.1"), metrics)
    assert not passed
    assert reasons == ["win_rate_lower 0.53 > 0.5 ✓", "kl_per_token 0.31 ≥ 0.1 ✗ (needs < 0.1)"]

    passed, reasons = check_gate(parse_gate("win_rate_lower>0.5"), {"win_rate_lower": 0.50001})
    assert passed and reasons == ["win_rate_lower 0.50001 > 0.5 ✓"]  # not "0.5 > 0.5"

    passed, reasons = check_gate(parse_gate("win_rate_lowr>0.5"), metrics)
    assert not passed
    assert reasons[0].startswith("metric 'win_rate_lowr' not computed (available: kl_per_token, reward_delta, "
                                 "win_rate_lower)")
    assert "did you mean 'win_rate_lower'" in reasons[0]

    passed, reasons = check_gate(parse_gate("win_rate_excluding_ties>0.5"), metrics)
    assert not passed and "None" in reasons[0] and "✗" in reasons[0]


# ---- plots and report ---------------------------------------------------------------------------------------

def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path


def test_plots_are_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    c_reward, b_reward = rng.normal(0.5, 1.0, 50), rng.normal(0.0, 1.0, 50)
    c_len, b_len = rng.integers(20, 80, 50), rng.integers(20, 60, 50)
    assert_png(plot_reward_distributions(c_reward, b_reward, tmp_path / "rewards.png"))
    assert_png(plot_length_vs_reward({"candidate": (c_len, c_reward), "baseline": (b_len, b_reward)},
                                     tmp_path / "length.png", "candidate vs baseline"))
    assert_png(plot_win_rate(win_rate(SIX_TWO_TWO), tmp_path / "win.png"))
    assert_png(plot_win_rate(win_rate([0] * 5), tmp_path / "ties.png"))  # one segment only
    rows = [{"step": s, "train/loss": 2.0 / s, "train/reward_mean": 0.1 * s, "policy/approx_kl": 0.01 * s,
             "train/lr": 1e-4} for s in range(1, 11)]
    rows += [{"step": 10, "eval/loss": 0.3, "eval/reward_mean": 1.1}]
    assert_png(plot_run_curves(rows, tmp_path / "curves.png", "tiny PPO"))
    assert_png(plot_run_curves([{"step": 1, "train/lr": 1e-4}], tmp_path / "nothing.png", "no families"))


def test_write_comparison_report(tmp_path: Path) -> None:
    metrics = evaluation_metrics()
    folder = tmp_path / "out"
    folder.mkdir()
    plots = {"win rate": plot_win_rate(win_rate(SIX_TWO_TWO), folder / "win.png")}
    gate = check_gate(parse_gate("win_rate_lower>0.5,kl_per_token<1"), metrics)
    samples = [{"prompt": "a | b\nc", "candidate": "<b>bold</b>", "baseline": "ok", "candidate_reward": 1.25}]
    report = write_comparison_report(folder, metrics, plots, gate, samples, "tiny eval")
    text = report.read_text()
    verdict = text.splitlines()[2]
    assert verdict.startswith("Candidate wins 70% [40%, 89%] of 10 prompts against baseline (2 ties, counted as "
                              "half), not distinguishable from a tie; reward +0.55 (0.5 → 1.05); KL 0.625 "
                              "nats/sequence; lengths 1.3 → 2.9 tokens.")
    assert "**Gate FAILED:**" in text and "- win_rate_lower 0.3968 ≤ 0.5 ✗ (needs > 0.5)" in text
    assert "![win rate](win.png)" in text
    assert "| a \\| b<br>c | &lt;b&gt;bold&lt;/b&gt; | ok | 1.25 |" in text
    assert "| `reward_mean` | 1.05 | 0.5 | mean reward |" in text
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["gate_passed"] is False and len(saved["gate_reasons"]) == 2
    assert saved["win_rate"] == pytest.approx(0.7) and saved["candidate_distinct_2"] == metrics["candidate_distinct_2"]


def test_report_warns_of_length_hacking(tmp_path: Path) -> None:
    candidate = completion_metrics([1.0, 2.0, 3.0, 4.0], [10, 20, 30, 40])
    baseline = completion_metrics([1.0, 1.0, 2.0, 1.5], [10, 12, 11, 10])
    metrics = flatten_metrics(candidate, baseline, win_rate([1, 1, 1, 1]))
    text = write_comparison_report(tmp_path, metrics, {}, None, [], "hacked").read_text()
    # 4 wins of 4: Wilson lower = (1 + z²/8)/(1 + z²/4) − z/(1 + z²/4)·z/8 = 0.755054 − 0.244945 = 0.510109
    assert "Candidate wins 100% [51%, 100%] of 4 prompts against baseline, better than baseline" in text
    assert "reward follows length (Pearson +1.00)" in text
    assert "**Gate" not in text
