"""``alignloop evaluate --task classification|ner``: how good is a classifier, and is the candidate better?

1. Each model (any HF ``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification``
   folder or id) predicts every example of a labelled set: ``text, label`` records (sentiment:
   ``.tsv`` SST-2, ``tsv:`` UCI sentences, JSONL, CSV) or ``tokens, tags`` records (NER: ``conll:``
   files, JSONL).
2. Labels are the model's own (``config.id2label``): an integer label in the data is a class id, a
   string must be one of the model's label names, so a report never silently compares "1" with
   "POSITIVE".
3. scikit-learn (labels) or seqeval (entity spans) compute the report
   (:mod:`alignloop.report.classification`); each model gets ``<run>/<role>/report.md`` with a
   confusion matrix, and the run folder a side-by-side ``report.md`` and a flat ``metrics.json``
   whose keys a gate names (``candidate_accuracy``, ``macro_f1_delta``, ...).

NER words are split into sub-tokens by the model's (fast) tokenizer; a word's tag is the prediction
at its first sub-token. Words past ``max_length`` sub-tokens are predicted ``O`` and counted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from alignloop.config import EvaluateConfig, save_config
from alignloop.data.load import load_records
from alignloop.data.records import Row
from alignloop.errors import ConfigError, DataError, ModelError
from alignloop.evaluate.gates import check_gate, parse_gate
from alignloop.models.classifier import label_names, label_probabilities, load_classifier, word_tag_probabilities
from alignloop.report import classification as reports
from alignloop.report.markdown import md_table

log = logging.getLogger("alignloop")

RECORD_KIND = {"classification": "labelled", "ner": "tagged"}
HEADLINE = {"classification": ("accuracy", "macro_f1", "weighted_f1"), "ner": ("micro_f1", "macro_f1", "accuracy")}
# The F1 numbers whose candidate − baseline difference gets a paired bootstrap interval (``macro_f1_delta_lower``):
# a gate on ``macro_f1_delta>0`` would promote on noise; ``macro_f1_delta_lower>0`` only on a difference that holds.
F1_AVERAGES = {"classification": {"macro_f1": "macro"}, "ner": {"micro_f1": "micro", "macro_f1": "macro"}}
BOOTSTRAP_SAMPLES = 2000


def metric_keys(task: str) -> frozenset[str]:
    """The flat metric names a classifier gate may name."""
    head = HEADLINE[task]
    intervals = [f"{k}_delta_{end}" for k in F1_AVERAGES[task] for end in ("lower", "upper")]
    return frozenset([f"{side}_{k}" for side in ("candidate", "baseline") for k in head] + [f"{k}_delta" for k in head]
                     + intervals)


def run_classifier_evaluate(cfg: EvaluateConfig) -> int:
    """Report the candidate (and baseline) on ``cfg.data``; return 0 when the gate passes or there is none, else 1."""
    task = cfg.task
    if not cfg.candidate:
        raise ConfigError("candidate: name the classifier to evaluate (--candidate PATH)")
    if not cfg.data:
        raise ConfigError(f"data: name the labelled examples for --task {task} (records with "
                          f"{'text, label' if task == 'classification' else 'tokens, tags; or conll:FILE'})")
    gate = parse_gate(cfg.gate, known=metric_keys(task)) if cfg.gate else None
    rows, _ = load_records(cfg.data, (RECORD_KIND[task],), cfg.max_prompts)
    out = Path(cfg.run.output_dir) / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    roles = {"candidate": cfg.candidate, **({"baseline": cfg.baseline} if cfg.baseline else {})}
    check_labels(rows, task, roles)
    results, answers = {}, {}
    for role, path in roles.items():
        model, tokenizer = load_classifier(path, task, role)
        log.info("evaluate: %s %s predicts %d examples", role, path, len(rows))
        evaluate = evaluate_labels if task == "classification" else evaluate_tags
        report, text, plots, answers[role] = evaluate(model, tokenizer, rows, cfg.sampling.batch_size, cfg.max_length, out / role)
        reports.write_classification_report(out / role, report, text, plots, f"{role}: {path} on {cfg.data}")
        results[role] = report

    metrics = flatten(results, HEADLINE[task])
    if "baseline" in answers:
        metrics.update(f1_delta_intervals(task, answers["candidate"], answers["baseline"], cfg.sampling.seed))
    gate_result = check_gate(gate, metrics) if gate else None
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_summary(out, roles, results, HEADLINE[task], gate_result, cfg.data)
    log.info("evaluate: report in %s", out / "report.md")
    print(reports.classification_verdict(results["candidate"]))
    if gate_result is None:
        return 0
    passed, reasons = gate_result
    print(f"gate {'passed' if passed else 'FAILED'}: " + "; ".join(reasons))
    return 0 if passed else 1


def f1_delta_intervals(task: str, candidate: tuple[list, list], baseline: tuple[list, list], seed: int) -> dict:
    """``<f1>_delta_lower`` / ``_upper``: the paired bootstrap 95% interval of candidate − baseline
    F1 over the same examples (:func:`alignloop.report.stats.paired_bootstrap_f1_delta`)."""
    from alignloop.report.stats import entity_f1_counts, label_f1_counts, paired_bootstrap_f1_delta

    gold, predicted_c = candidate
    predicted_b = baseline[1]
    if task == "classification":
        labels = sorted({*gold, *predicted_c, *predicted_b})
        counts = [label_f1_counts(gold, p, labels) for p in (predicted_c, predicted_b)]
    else:
        types = sorted({tag[2:] for sentences in (gold, predicted_c, predicted_b) for s in sentences for tag in s if tag[:2] in ("B-", "I-")})
        counts = [entity_f1_counts(gold, p, types) for p in (predicted_c, predicted_b)]
    flat = {}
    for key, average in F1_AVERAGES[task].items():
        interval = paired_bootstrap_f1_delta(*counts, average, samples=BOOTSTRAP_SAMPLES, seed=seed)
        flat[f"{key}_delta_lower"], flat[f"{key}_delta_upper"] = interval["lower"], interval["upper"]
    return flat


def check_labels(rows: Sequence[Row], task: str, roles: dict[str, str]) -> None:
    """The data's labels against every model's label names, read from its config alone (no weights
    loaded): a mismatch fails before any model predicts, not after the candidate's whole pass."""
    from transformers import AutoConfig

    from alignloop.models.load import _check_reachable, _first_line

    for role, path in roles.items():
        _check_reachable(path, role)
        try:
            id2label = AutoConfig.from_pretrained(path).id2label
        except (OSError, ValueError) as e:
            raise ModelError(f"{role} {path!r}: cannot read its config ({_first_line(e)})") from None
        try:
            gold_labels(rows, "label" if task == "classification" else "tags", [str(id2label[i]) for i in range(len(id2label))])
        except DataError as e:
            raise DataError(f"{e} ({role} {path})") from None


def gold_labels(rows: Sequence[Row], field: str, names: list[str]) -> list[list[str]] | list[str]:
    """The data's labels as the model's class names; an unknown one is a DataError naming its row."""
    known = set(names)

    def name_of(value: Any, row: Row) -> str:
        if isinstance(value, int):
            if 0 <= value < len(names):
                return names[value]
            raise DataError(f"{row.where}: field '{field}' is class id {value}, but the model has {len(names)} classes "
                            f"({', '.join(names)})")
        if value not in known:
            raise DataError(f"{row.where}: field '{field}' is {value!r}, not one of the model's labels ({', '.join(names)})")
        return value

    if field == "label":
        return [name_of(row.fields["label"], row) for row in rows]
    return [[name_of(tag, row) for tag in row.fields["tags"]] for row in rows]


def evaluate_labels(model: Any, tokenizer: Any, rows: Sequence[Row], batch_size: int, max_length: int,
                    folder: Path) -> tuple[dict, str, dict[str, Path], tuple[list, list]]:
    names = label_names(model)
    gold = gold_labels(rows, "label", names)
    probs = label_probabilities(model, tokenizer, [r.fields["text"] for r in rows], batch_size, max_length)
    predicted = [names[i] for i in probs.argmax(-1).tolist()]
    return (*reports.report_labels(gold, predicted, names, folder), (gold, predicted))


def evaluate_tags(model: Any, tokenizer: Any, rows: Sequence[Row], batch_size: int, max_length: int,
                  folder: Path) -> tuple[dict, str, dict[str, Path], tuple[list, list]]:
    names = label_names(model)
    gold = gold_labels(rows, "tags", names)
    probs, cut = word_tag_probabilities(model, tokenizer, [r.fields["tokens"] for r in rows], batch_size, max_length)
    if cut:
        log.warning("evaluate: %d words lay past %d sub-tokens and were predicted O", cut, max_length)
    predicted = [[names[i] for i in sentence.argmax(-1).tolist()] for sentence in probs]
    report, text, plots = reports.report_tags(gold, predicted, names, folder)
    report["words_past_max_length"] = cut
    return report, text, plots, (gold, predicted)


def flatten(results: dict[str, dict], headline: Sequence[str]) -> dict:
    """``candidate_<k>``, ``baseline_<k>`` and ``<k>_delta`` (candidate − baseline) for each headline number."""
    flat = {f"{role}_{k}": report[k] for role, report in results.items() for k in headline}
    if "baseline" in results:
        flat.update({f"{k}_delta": results["candidate"][k] - results["baseline"][k] for k in headline})
    flat["examples"] = results["candidate"].get("support", results["candidate"].get("sentences"))
    return flat


def write_summary(out: Path, roles: dict[str, str], results: dict[str, dict], headline: Sequence[str],
                  gate_result: tuple[bool, list[str]] | None, data: str) -> Path:
    """The run's ``report.md``: headline numbers side by side, the gate, links to each model's report."""
    lines = [f"# Classifier evaluation on {data}", "",
             *md_table(("model", "path", *headline),
                       ([f"[{role}]({role}/report.md)", f"`{path}`", *(f"{results[role][k]:.3f}" for k in headline)]
                        for role, path in roles.items())),
             ""]
    for role in roles:
        lines.append(f"**{role}**: {reports.classification_verdict(results[role])}  ")
    if gate_result is not None:
        passed, reasons = gate_result
        lines += ["", f"## Gate: {'passed' if passed else 'FAILED'}", "", *[f"- {r}" for r in reasons]]
    lines += ["", *[f"![{role} confusion matrix]({role}/confusion_matrix.png)" for role in roles], "",
              "Every number: `metrics.json` here and in each model's folder."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
