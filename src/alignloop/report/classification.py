"""How good is a classifier? Per-label precision/recall/F1 for labels (sentiment) and entity spans (NER).

Thin wrappers: scikit-learn computes the label metrics and seqeval the span metrics, so the numbers
are exactly what those libraries report (and what papers quote); this module only makes them
JSON-serialisable, adds the headline numbers, draws the confusion matrix and writes the report.
``evaluate --task`` and the end of ``alignloop classify`` both report through :func:`report_labels`
and :func:`report_tags`, so a trained model's report reads as its evaluation would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignloop.report.markdown import markdown_images, md_table
from alignloop.report.plots import figure


def _jsonable(value):
    """numpy scalars (sklearn's supports, seqeval's scores) as Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _same_length(y_true: Sequence, y_pred: Sequence, what: str) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true {what} but {len(y_pred)} predicted; give one prediction per item")
    if len(y_true) == 0:
        raise ValueError(f"no {what} to evaluate")


def classification_report_labels(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None) -> dict:
    """Per-label precision, recall, F1 and support from scikit-learn, plus the headline numbers.

    For label ℓ: precision_ℓ = TP_ℓ / (TP_ℓ + FP_ℓ), recall_ℓ = TP_ℓ / (TP_ℓ + FN_ℓ),
    F1_ℓ = 2·P·R / (P + R); a 0/0 is 0 (``zero_division=0``), so a label never predicted scores 0.

        accuracy    = (1/N) Σ_i [ŷ_i = y_i]
        macro_f1    = (1/K) Σ_ℓ F1_ℓ                 every label weighs the same: minority labels count
        weighted_f1 = Σ_ℓ (support_ℓ / N) F1_ℓ

    ``labels`` fixes the labels and their order (default: sorted union of both lists); macro and
    weighted F1 are over those labels. Returns ``{accuracy, macro_f1, weighted_f1, support,
    per_label}``, ``per_label`` being sklearn's ``classification_report(output_dict=True)``
    (label keys as strings; its "macro avg" and "weighted avg" rows included).
    """
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    _same_length(y_true, y_pred, "labels")
    per_label = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
    return _jsonable({
        "accuracy": accuracy_score(y_true, y_pred),
        "macro_f1": f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
        "weighted_f1": f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0),
        "support": len(y_true),
        "per_label": per_label,
    })


def classification_text(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None, digits: int = 3) -> str:
    """scikit-learn's text table of the same report, for ``report.md``."""
    from sklearn.metrics import classification_report

    _same_length(y_true, y_pred, "labels")
    return classification_report(y_true, y_pred, labels=labels, digits=digits, zero_division=0)


def _check_tags(y_true_tags: Sequence[Sequence[str]], y_pred_tags: Sequence[Sequence[str]]) -> None:
    _same_length(y_true_tags, y_pred_tags, "sentences")
    for i, (t, p) in enumerate(zip(y_true_tags, y_pred_tags)):
        if len(t) != len(p):
            raise ValueError(f"sentence {i}: {len(t)} true tags but {len(p)} predicted; tag every token once")


def ner_report(y_true_tags: Sequence[Sequence[str]], y_pred_tags: Sequence[Sequence[str]]) -> dict:
    """Entity-level precision, recall and F1 per type from seqeval (BIO tags), plus the headline numbers.

    An entity is a maximal span (type, start, end) decoded from the tags the conlleval way
    (``mode=None``: an I-X after O starts a new X). A predicted entity is a true positive only if
    type, start and end all match a true one, so a span cut short is one false positive and one
    false negative: [B-PER, I-PER] predicted as [B-PER, O] scores 0 for that entity.

        micro_f1 = F1 of TP, FP, FN pooled over types    (seqeval's headline number)
        macro_f1 = (1/K) Σ_type F1_type
        accuracy = token-level share of tags predicted exactly (O included: high even when spans are wrong)

    Returns ``{micro_f1, macro_f1, accuracy, sentences, tokens, per_type}``, ``per_type`` being
    seqeval's ``classification_report(output_dict=True)`` (with its micro/macro/weighted avg rows).
    """
    from seqeval.metrics import accuracy_score, classification_report, f1_score

    _check_tags(y_true_tags, y_pred_tags)
    true, pred = [list(s) for s in y_true_tags], [list(s) for s in y_pred_tags]
    per_type = classification_report(true, pred, output_dict=True, mode=None, zero_division=0)
    return _jsonable({
        "micro_f1": f1_score(true, pred, average="micro", mode=None, zero_division=0),
        "macro_f1": f1_score(true, pred, average="macro", mode=None, zero_division=0),
        "accuracy": accuracy_score(true, pred),
        "sentences": len(true),
        "tokens": sum(len(s) for s in true),
        "per_type": per_type,
    })


def ner_text(y_true_tags: Sequence[Sequence[str]], y_pred_tags: Sequence[Sequence[str]], digits: int = 3) -> str:
    """seqeval's text table of the same report, for ``report.md``."""
    from seqeval.metrics import classification_report

    _check_tags(y_true_tags, y_pred_tags)
    return classification_report([list(s) for s in y_true_tags], [list(s) for s in y_pred_tags], digits=digits,
                                 mode=None, zero_division=0)


def plot_confusion_matrix(y_true: Sequence, y_pred: Sequence, labels: Sequence, out: Path,
                          title: str = "confusion matrix") -> Path:
    """Rows are true labels, columns predicted; each cell shows its count, its colour the row share.

    Colour is normalised per true label (the cell's share of that label's examples, i.e. recall on
    the diagonal), so a rare label's errors are as visible as a common one's.
    """
    from sklearn.metrics import confusion_matrix

    _same_length(y_true, y_pred, "labels")
    counts = confusion_matrix(y_true, y_pred, labels=labels)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    k = len(labels)
    size = 2.4 + 0.55 * k  # inches: axes labels and colour bar, then one cell per label
    with figure(out, figsize=(size + 1.0, size)) as (fig, ax):
        image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's examples")
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{counts[i, j]:,}", ha="center", va="center", fontsize=9,
                        color="white" if shares[i, j] > 0.5 else "black")  # dark cells get white text
        names = [str(label) for label in labels]
        slanted = max(len(n) for n in names) > 4  # long names overlap unless slanted
        ax.set_xticks(range(k), names, rotation=45 if slanted else 0, ha="right" if slanted else "center")
        ax.set_yticks(range(k), names)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
        ax.set_title(f"{title} (n={len(y_true):,})")
    return Path(out)


def classification_verdict(report: dict) -> str:
    """One line of headline numbers from either report."""
    if "micro_f1" in report:
        return (f"Entity micro F1 {report['micro_f1']:.3f}, macro F1 {report['macro_f1']:.3f} on "
                f"{report['sentences']:,} sentences; token accuracy {report['accuracy']:.3f} (counts O tags).")
    return (f"Accuracy {report['accuracy']:.3f}, macro F1 {report['macro_f1']:.3f}, weighted F1 "
            f"{report['weighted_f1']:.3f} on {report['support']:,} examples.")


def write_classification_report(folder: Path, report: dict, text_report: str, plots: dict[str, Path],
                                title: str) -> Path:
    """``metrics.json`` (``report``) and ``report.md`` (headline, the library's text table, images) in ``folder``.

    ``report`` is :func:`classification_report_labels` or :func:`ner_report`; ``text_report`` the
    matching :func:`classification_text` or :func:`ner_text`; ``plots`` maps alt text to PNGs.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    text = "\n".join([
        f"# {title}",
        "",
        classification_verdict(report),
        "",
        "```text",
        text_report.rstrip(),
        "```",
        "",
        *markdown_images(folder, plots),
        "Every number: `metrics.json`.",
    ])
    out = folder / "report.md"
    out.write_text(text.rstrip() + "\n")
    return out


def report_labels(gold: Sequence[str], predicted: Sequence[str], names: Sequence[str],
                  folder: Path) -> tuple[dict, str, dict[str, Path]]:
    """The label report, its text table and the confusion matrix (``folder/confusion_matrix.png``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plot = plot_confusion_matrix(gold, predicted, names, folder / "confusion_matrix.png")
    return (classification_report_labels(gold, predicted, labels=names),
            classification_text(gold, predicted, labels=names), {"confusion matrix": plot})


def report_tags(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], names: Sequence[str],
                folder: Path) -> tuple[dict, str, dict[str, Path]]:
    """The entity report, its text table and a per-token confusion matrix over entity types."""
    report = ner_report(gold, predicted)
    # The confusion matrix is per token over entity types (B-/I- folded together): which types get mixed up.
    types = sorted({entity_type(n) for n in names})
    flat_gold = [entity_type(t) for sentence in gold for t in sentence]
    flat_pred = [entity_type(t) for sentence in predicted for t in sentence]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plot = plot_confusion_matrix(flat_gold, flat_pred, types, folder / "confusion_matrix.png", title="token entity types")
    return report, ner_text(gold, predicted), {"confusion matrix (tokens, entity types)": plot}


def entity_type(tag: str) -> str:
    """``PER`` for ``B-PER`` or ``I-PER``; ``O`` (or an unprefixed tag) as it is."""
    return tag.split("-", 1)[1] if tag[:2] in ("B-", "I-") else tag


def per_class_table(report: dict) -> list[str]:
    """Markdown lines: precision, recall, F1 and support of each label (or entity type) of either report."""
    per_class = report.get("per_label", report.get("per_type", {}))
    averages = ("accuracy", "macro avg", "weighted avg", "micro avg")
    return md_table(("class", "precision", "recall", "F1", "support"),
                    ([f"`{name}`", f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1-score']:.3f}", f"{int(row['support']):,}"]
                     for name, row in per_class.items() if name not in averages and isinstance(row, dict)))
