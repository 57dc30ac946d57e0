"""F1 from per-example counts and the paired bootstrap of an F1 difference (report/stats.py)."""

from __future__ import annotations

import numpy as np
import pytest

from alignloop.report.stats import entity_f1_counts, f1_from_counts, label_f1_counts, paired_bootstrap_f1_delta


def test_counts_give_scikit_learns_macro_f1_and_seqevals_micro_f1() -> None:
    from seqeval.metrics import f1_score as entity_f1
    from sklearn.metrics import f1_score

    labels = ["a", "b", "c", "d"]  # "d" is never seen: its F1 is 0/0 → 0, as zero_division=0
    gold = ["a", "a", "b", "c", "c", "c", "b"]
    pred = ["a", "b", "b", "c", "a", "c", "c"]
    counts = label_f1_counts(gold, pred, labels)
    # by hand: a: TP 1, FP 1, FN 1 → 0.5; b: TP 1, FP 1, FN 1 → 0.5; c: TP 2, FP 1, FN 1 → 2/3; d: 0
    assert f1_from_counts(counts.sum(axis=0), "macro") == pytest.approx((0.5 + 0.5 + 2 / 3 + 0) / 4)
    assert f1_from_counts(counts.sum(axis=0), "macro") == pytest.approx(
        f1_score(gold, pred, labels=labels, average="macro", zero_division=0))

    gold_tags = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"], ["B-LOC", "O"]]
    pred_tags = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG"], ["O", "B-PER"]]
    counts = entity_f1_counts(gold_tags, pred_tags, ["LOC", "ORG", "PER"])
    # by hand: TP = LOC, ORG (2); FP = PER cut short, PER in sentence 3 (2); FN = PER, LOC (2) → 0.5
    assert f1_from_counts(counts.sum(axis=0), "micro") == pytest.approx(0.5)
    assert f1_from_counts(counts.sum(axis=0), "micro") == pytest.approx(entity_f1(gold_tags, pred_tags))


def test_paired_bootstrap_finds_a_real_difference_and_not_a_missing_one() -> None:
    rng = np.random.default_rng(1)
    labels = ["x", "y", "z"]
    gold = list(rng.choice(labels, size=600))
    noisy = lambda share: [g if rng.random() > share else rng.choice(labels) for g in gold]  # noqa: E731
    baseline = label_f1_counts(gold, noisy(0.5), labels)
    better = label_f1_counts(gold, noisy(0.2), labels)
    same_skill = label_f1_counts(gold, noisy(0.5), labels)

    up = paired_bootstrap_f1_delta(better, baseline, "macro", samples=500)
    assert up["lower"] > 0 and up["lower"] <= up["delta"] <= up["upper"]
    tie = paired_bootstrap_f1_delta(same_skill, baseline, "macro", samples=500)
    assert tie["lower"] < 0 < tie["upper"]
    itself = paired_bootstrap_f1_delta(baseline, baseline, "macro", samples=100)
    assert itself == {"delta": 0.0, "lower": 0.0, "upper": 0.0, "samples": 100}


def test_mismatched_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="counts must both be"):
        paired_bootstrap_f1_delta(np.zeros((3, 2, 3)), np.zeros((4, 2, 3)), "macro")
