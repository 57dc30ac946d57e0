"""Classifier reports: the numbers are scikit-learn's and seqeval's (checked against them called directly
and by hand), entity spans must match exactly, and the plot and report files are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import seqeval.metrics
import sklearn.metrics

from alignloop.report.classification import (
    classification_report_labels,
    classification_text,
    ner_report,
    ner_text,
    plot_confusion_matrix,
    write_classification_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

Y_TRUE = ["pos", "neg", "neu", "pos", "neg", "pos"]
Y_PRED = ["pos", "neg", "pos", "pos", "neu", "neg"]
LABELS = ["neg", "neu", "pos"]

TAGS_TRUE = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]
TAGS_PRED = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]  # PER cut short


def test_label_report_matches_sklearn_and_hand() -> None:
    r = classification_report_labels(Y_TRUE, Y_PRED)
    assert r["per_label"] == sklearn.metrics.classification_report(Y_TRUE, Y_PRED, output_dict=True, zero_division=0)
    assert r["accuracy"] == sklearn.metrics.accuracy_score(Y_TRUE, Y_PRED)
    assert r["macro_f1"] == sklearn.metrics.f1_score(Y_TRUE, Y_PRED, average="macro", zero_division=0)
    assert r["weighted_f1"] == sklearn.metrics.f1_score(Y_TRUE, Y_PRED, average="weighted", zero_division=0)
    # by hand: pos is true at 0, 3, 5 and predicted at 0, 2, 3 → TP 2, FP 1, FN 1 → P = R = F1 = 2/3
    #          neg true 1, 4, predicted 1, 5 → TP 1, FP 1, FN 1 → F1 ½; neu true 2, predicted 4 → F1 0
    assert r["per_label"]["pos"]["f1-score"] == pytest.approx(2 / 3, abs=1e-12)
    assert r["accuracy"] == pytest.approx(3 / 6, abs=1e-12)  # right at 0, 1, 3
    assert r["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3, abs=1e-12)
    assert r["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2 + 1 * 0) / 6, abs=1e-12)
    assert r["support"] == 6
    json.dumps(r)


def test_label_report_with_integer_labels_is_json() -> None:
    r = classification_report_labels([0, 1, 2, 1], [0, 1, 1, 1], labels=[0, 1, 2])
    assert set(r["per_label"]) >= {"0", "1", "2", "macro avg", "weighted avg"}
    assert r["per_label"]["2"]["recall"] == 0.0  # never predicted: zero_division=0, no warning
    json.loads(json.dumps(r))
    with pytest.raises(ValueError, match="one prediction per item"):
        classification_report_labels([0, 1], [0])


def test_ner_report_matches_seqeval_and_hand() -> None:
    r = ner_report(TAGS_TRUE, TAGS_PRED)
    assert r["per_type"] == seqeval.metrics.classification_report(TAGS_TRUE, TAGS_PRED, output_dict=True,
                                                                   zero_division=0)
    # entities: true PER(0–1), LOC(3), ORG(1–2); predicted PER(0), LOC(3), ORG(1–2)
    # → PER: TP 0, FP 1, FN 1 (F1 0); LOC and ORG exact (F1 1); micro: TP 2, FP 1, FN 1 → F1 2/3
    assert r["per_type"]["PER"]["f1-score"] == 0.0
    assert r["micro_f1"] == pytest.approx(2 / 3, abs=1e-12)
    assert r["micro_f1"] == pytest.approx(seqeval.metrics.f1_score(TAGS_TRUE, TAGS_PRED), abs=1e-12)
    assert r["macro_f1"] == pytest.approx((0 + 1 + 1) / 3, abs=1e-12)
    assert r["accuracy"] == pytest.approx(6 / 7, abs=1e-12)  # one tag of seven wrong
    assert (r["sentences"], r["tokens"]) == (2, 7)
    json.dumps(r)


def test_partial_span_counts_as_wrong() -> None:
    r = ner_report([["B-PER", "I-PER"]], [["B-PER", "O"]])
    assert r["micro_f1"] == 0.0  # the predicted PER(0) is not the true PER(0–1)
    assert r["accuracy"] == 0.5  # while half the tags are right
    assert ner_report([["B-PER", "I-PER"]], [["B-PER", "I-PER"]])["micro_f1"] == 1.0


def test_ner_report_rejects_ragged_tags() -> None:
    with pytest.raises(ValueError, match="sentence 1"):
        ner_report(TAGS_TRUE, [TAGS_PRED[0], ["O"]])


def test_confusion_matrix_and_report_written(tmp_path: Path) -> None:
    png = plot_confusion_matrix(Y_TRUE, Y_PRED, LABELS, tmp_path / "confusion.png", "sentiment")
    data = png.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
    assert plot_confusion_matrix([0, 1], [0, 0], [0, 1, 2], tmp_path / "empty_row.png").stat().st_size > 1000

    r = classification_report_labels(Y_TRUE, Y_PRED, LABELS)
    report = write_classification_report(tmp_path, r, classification_text(Y_TRUE, Y_PRED, LABELS),
                                         {"confusion matrix": png}, "sentiment classifier")
    text = report.read_text()
    assert "Accuracy 0.500, macro F1 0.389, weighted F1 0.500 on 6 examples." in text
    assert "```text\n" in text and "weighted avg" in text
    assert "![confusion matrix](confusion.png)" in text
    assert json.loads((tmp_path / "metrics.json").read_text()) == r

    ner = write_classification_report(tmp_path / "ner", ner_report(TAGS_TRUE, TAGS_PRED),
                                      ner_text(TAGS_TRUE, TAGS_PRED), {}, "tagger").read_text()
    assert "Entity micro F1 0.667, macro F1 0.667 on 2 sentences" in ner and "PER" in ner
