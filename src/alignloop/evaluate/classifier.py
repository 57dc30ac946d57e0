"""``alignloop evaluate --task classification|ner``: how good is a classifier, and is the candidate better?

1. Each model (any HF ``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification``
   folder or id) predicts every example of a labelled set: ``text, label`` records (sentiment:
   ``.tsv`` SST-2, ``tsv:`` UCI sentences, JSONL, CSV) or ``tokens, tags`` records (NER: ``conll:``
   files, JSONL).
2. Labels are the model's own (``config.id2label``): an integer label in the data is a class id, a
   string must be one of the model's label names, so a report never silently compares "1" with
   "POSITIVE".
3. scikit-learn (labels) or seqeval (entity spans) compute the report
   (:mod:`alignloop.evaluate.classification`); each model gets ``<run>/<role>/report.md`` with a
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

import torch

from alignloop.config import EvaluateConfig, save_config
from alignloop.data.load import load_records
from alignloop.data.records import Row
from alignloop.errors import ConfigError, DataError, ModelError
from alignloop.evaluate import classification as reports
from alignloop.evaluate.gates import check_gate, parse_gate
from alignloop.report.markdown import md_table

log = logging.getLogger("alignloop")

RECORD_KIND = {"classification": "labelled", "ner": "tagged"}
HEADLINE = {"classification": ("accuracy", "macro_f1", "weighted_f1"), "ner": ("micro_f1", "macro_f1", "accuracy")}


def metric_keys(task: str) -> frozenset[str]:
    """The flat metric names a classifier gate may name."""
    head = HEADLINE[task]
    return frozenset([f"{side}_{k}" for side in ("candidate", "baseline") for k in head] + [f"{k}_delta" for k in head])


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
    results = {}
    for role, path in roles.items():
        model, tokenizer = load_classifier(path, task, role)
        log.info("evaluate: %s %s predicts %d examples", role, path, len(rows))
        evaluate = evaluate_labels if task == "classification" else evaluate_tags
        report, text, plots = evaluate(model, tokenizer, rows, cfg.sampling.batch_size, cfg.max_length, out / role)
        reports.write_classification_report(out / role, report, text, plots, f"{role}: {path} on {cfg.data}")
        results[role] = report

    metrics = flatten(results, HEADLINE[task])
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


def load_classifier(path: str, task: str, role: str) -> tuple[Any, Any]:
    """A sequence or token classifier and its tokenizer, in eval mode on the inference device."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    from alignloop.models.load import _check_reachable, _first_line, inference_device

    _check_reachable(path, role)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForTokenClassification
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = auto.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{role} {path!r}: cannot load as a {auto.__name__.removeprefix('AutoModelFor')} model "
                         f"({_first_line(e)})") from None
    if tokenizer.pad_token is None:  # decoder backbones: pad with EOS; the model finds the last real token
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    if task == "ner" and not tokenizer.is_fast:
        raise ModelError(f"{role} {path!r}: NER needs a fast tokenizer (word alignment); this one is {type(tokenizer).__name__}")
    return model.to(inference_device()).eval(), tokenizer


def label_names(model: Any) -> list[str]:
    """The model's class names in id order."""
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(len(id2label))]


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


@torch.inference_mode()
def predict_labels(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int) -> list[int]:
    """The argmax class id of each text; batches of similar length so little is padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    predicted = [0] * len(texts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in chunk], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt").to(model.device)
        for i, label in zip(chunk, model(**batch).logits.argmax(-1).tolist()):
            predicted[i] = label
    return predicted


@torch.inference_mode()
def predict_tags(model: Any, tokenizer: Any, sentences: Sequence[list[str]], batch_size: int,
                 max_length: int) -> tuple[list[list[int]], int]:
    """Each word's class id, read at its first sub-token; returns the ids and how many words were
    cut off by ``max_length`` (those get class ``O`` if the model has it, else class 0)."""
    names = label_names(model)
    outside = names.index("O") if "O" in names else 0
    predicted: list[list[int]] = [[] for _ in sentences]
    cut = 0
    for start in range(0, len(sentences), batch_size):
        chunk = list(range(start, min(start + batch_size, len(sentences))))
        batch = tokenizer([sentences[i] for i in chunk], is_split_into_words=True, truncation=True,
                          max_length=max_length, padding=True, return_tensors="pt")
        ids = model(**batch.to(model.device)).logits.argmax(-1).tolist()
        for row, i in enumerate(chunk):
            first_piece: dict[int, int] = {}
            for position, word in enumerate(batch.word_ids(row)):
                if word is not None and word not in first_piece:
                    first_piece[word] = position
            words = len(sentences[i])
            cut += words - len(first_piece)
            predicted[i] = [ids[row][first_piece[w]] if w in first_piece else outside for w in range(words)]
    return predicted, cut


def evaluate_labels(model: Any, tokenizer: Any, rows: Sequence[Row], batch_size: int, max_length: int,
                    folder: Path) -> tuple[dict, str, dict[str, Path]]:
    names = label_names(model)
    gold = gold_labels(rows, "label", names)
    predicted = [names[i] for i in predict_labels(model, tokenizer, [r.fields["text"] for r in rows], batch_size, max_length)]
    folder.mkdir(parents=True, exist_ok=True)
    plot = reports.plot_confusion_matrix(gold, predicted, names, folder / "confusion_matrix.png")
    return (reports.classification_report_labels(gold, predicted, labels=names),
            reports.classification_text(gold, predicted, labels=names), {"confusion matrix": plot})


def evaluate_tags(model: Any, tokenizer: Any, rows: Sequence[Row], batch_size: int, max_length: int,
                  folder: Path) -> tuple[dict, str, dict[str, Path]]:
    names = label_names(model)
    gold = gold_labels(rows, "tags", names)
    ids, cut = predict_tags(model, tokenizer, [r.fields["tokens"] for r in rows], batch_size, max_length)
    if cut:
        log.warning("evaluate: %d words lay past %d sub-tokens and were predicted O", cut, max_length)
    predicted = [[names[i] for i in sentence] for sentence in ids]
    report = reports.ner_report(gold, predicted)
    report["words_past_max_length"] = cut
    # The confusion matrix is per token over entity types (B-/I- folded together): which types get mixed up.
    types = sorted({_entity_type(n) for n in names})
    flat_gold = [_entity_type(t) for sentence in gold for t in sentence]
    flat_pred = [_entity_type(t) for sentence in predicted for t in sentence]
    folder.mkdir(parents=True, exist_ok=True)
    plot = reports.plot_confusion_matrix(flat_gold, flat_pred, types, folder / "confusion_matrix.png",
                                         title="token entity types")
    return report, reports.ner_text(gold, predicted), {"confusion matrix (tokens, entity types)": plot}


def _entity_type(tag: str) -> str:
    return tag.split("-", 1)[1] if tag[:2] in ("B-", "I-") else tag


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
