"""``alignloop classify``: sequence classifiers (one label per text) and token classifiers (NER: one
BIO tag per word), supervised, on any HF backbone.

1. Records: ``text, label`` (classification) or ``tokens, tags`` (NER), validated once; the label
   names are the training data's, sorted (NER: ``O`` first, then ``B-X``, ``I-X`` per type), and are
   saved in the model's ``config.id2label``. A held-out label the training data never had is an
   error naming its file, line and field.
2. Encoding: the backbone's tokenizer; a text longer than ``data.max_length`` sub-tokens is cut
   there and counted. NER words are split into sub-tokens; the first carries the word's tag and the
   others are ignored by the loss (-100), as evaluation reads a word at its first sub-token
   (``classify.label_all_subtokens`` tags them all, continuations as ``I-``).
3. The loop (explicit, like ``train/sft.py``): batches of similar length (sorted within shuffled
   windows: little padding, measured and logged as ``train/padding``), forward, cross-entropy
   (optionally class-weighted), backward, clip, step, log; held-out loss and macro F1 (NER: entity
   micro F1) every ``train.eval_every`` steps.
4. ``classify.objective=bandit``: the records are ``bandit`` feedback (the shown output, its
   propensity, the user's verdict, the right label when they named it; one row per judged NER
   entity) on predictions of the logging classifier ``model.name_or_path``, which training starts
   from and whose label names it keeps. Each step's loss is the feedback objective of
   :mod:`alignloop.losses`: a bandit estimator (``classify.bandit_loss``) on log π_θ(shown|x) (an
   entity: the sum of its words' log-probabilities of the shown tags B-T, I-T, ...), cross-entropy
   where the user named the right label, and α × cross-entropy on ``classify.supervised_path``.
   Held-out scores need labelled records in ``data.eval_path``. An NER entity whose words reach past
   ``data.max_length`` is left out of training and counted (its log-probability would be partial).
5. The end: ``final/`` (plain ``transformers`` loads it), and the held-out classification report of
   ``alignloop evaluate --task`` (:mod:`alignloop.report.classification`) in ``report.md``,
   ``metrics.json`` and ``confusion_matrix.png``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from alignloop.config import ClassifyConfig, ModelConfig
from alignloop.data.batching import IGNORE_INDEX, ShuffledBatches, split_holdout
from alignloop.data.load import load_records
from alignloop.data.records import Row
from alignloop.errors import ConfigError, DataError, ModelError
from alignloop.losses import BANDIT_LOSSES, feedback_objective
from alignloop.models.classifier import label_probabilities, word_tag_probabilities
from alignloop.models.load import load_tokenizer
from alignloop.models.reward import resolve_backbone
from alignloop.report import classification as reports
from alignloop.report.markdown import markdown_images
from alignloop.report.training import write_training_report
from alignloop.runs import Run
from alignloop.train.loop import TrainingSession, open_stage_run
from alignloop.train.sft import resolve_max_length

log = logging.getLogger("alignloop")

SUPERVISED_KINDS = ("labelled", "tagged")
TASK_OF_KIND = {"labelled": "classification", "tagged": "ner"}
HEADLINE = {"classification": "macro_f1", "ner": "micro_f1"}  # the number eval/ reports and the report leads with
REPORT_TABLE = {
    "classification": (("eval/macro_f1", "held-out macro F1"), ("eval/accuracy", "held-out accuracy")),
    "ner": (("eval/micro_f1", "held-out entity micro F1"), ("eval/macro_f1", "held-out entity macro F1"),
            ("eval/accuracy", "held-out token accuracy")),
}


@dataclass
class ClassifierExample:
    """One encoded record."""

    input_ids: list[int]  # (T,) sub-token ids with the tokenizer's special tokens, T ≤ max_length
    label: int | list[int]  # classification: the class id; ner: (T,) tag id per sub-token, IGNORE_INDEX where no loss
    word_positions: list[int]  # ner: the first sub-token of each word that fits (evaluation reads there); else []
    source: Row | None = None  # the record it encodes (the final report reads held-out records whole)
    # bandit feedback (reward is None on a supervised example); ``label`` is then the shown output
    # (ner: its tags on the entity's words, IGNORE_INDEX elsewhere)
    reward: float | None = None  # the verdict r in [0, 1]
    propensity: float = 1.0  # p: the chance the logging policy had of showing it
    target: int | list[int] | None = None  # the right label where the user named it, shaped as ``label``
    estimates: list[float] | None = None  # doubly_robust: r̂(x, a) for each class a (the logging model's probabilities)


def run_classify(cfg: ClassifyConfig) -> Run:
    """``alignloop classify``: read and check the records, build the classifier, train, report."""
    if not cfg.data.path:
        raise ConfigError("data.path: name the training records (`text, label` or `tokens, tags`; conll:FILE, tweeteval:DIR/SPLIT)")
    if cfg.classify.objective == "bandit":
        return run_bandit_classify(cfg)
    # Data is read and checked before the model loads: a typo should not wait for a download.
    rows, kind = load_records(cfg.data.path, ("bandit", *SUPERVISED_KINDS), cfg.data.max_samples)
    if kind == "bandit":  # read as labelled, a verdict's named label would train as if every row had one
        raise ConfigError(f"{cfg.data.path} holds bandit feedback (shown, propensity, reward): set classify.objective=bandit "
                          "and model.name_or_path to the classifier that served those predictions")
    task = resolve_task(cfg.classify.task, kind, cfg.data.path)
    names = label_names_of(rows, kind)
    if len(names) < 2:  # one class is nothing to learn, and transformers would read num_labels=1 as regression
        raise DataError(f"{cfg.data.path}: every record has the {'label' if kind == 'labelled' else 'tag'} {names[0]!r}; "
                        "a classifier needs examples of at least two")
    names = trained_label_names(cfg.model, names)
    held_rows: list[Row] | None = None
    if cfg.data.eval_path:
        held_rows, held_kind = load_records(cfg.data.eval_path, SUPERVISED_KINDS)
        if held_kind != kind:
            raise DataError(f"{cfg.data.eval_path}: {held_kind} records, but the training data holds {kind} records")
        check_known_labels(held_rows, kind, names, cfg.data.path)
    log.info("classify: %s over %d labels (%s) from %s", task, len(names), ", ".join(names), cfg.data.path)

    backbone = resolve_backbone(cfg.model)
    tokenizer = load_tokenizer(backbone)
    if task == "ner" and not tokenizer.is_fast:
        raise ModelError(f"model.name_or_path {backbone.name_or_path!r}: NER needs a fast tokenizer (word alignment); "
                         f"this one is {type(tokenizer).__name__}")
    model = load_classifier_backbone(backbone, task, names, cfg.train.seed)
    if model.config.pad_token_id is None:  # decoder backbones: the head finds each row's last real token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    max_length = resolve_max_length(cfg.data, model)
    label_ids = {name: i for i, name in enumerate(names)}
    examples = encode_rows(cfg.data.path, rows, task, tokenizer, label_ids, max_length, cfg)
    if held_rows is not None:
        train, held = examples, encode_rows(cfg.data.eval_path, held_rows, task, tokenizer, label_ids, max_length, cfg)
    else:
        train, held = split_holdout(examples, cfg.data.eval_fraction, cfg.train.seed)
        held_rows = [e.source for e in held]
    return fit_classifier(cfg, model, tokenizer, task, names, train, held, held_rows, max_length)


# ---------------------------------------------------------------------------------------------
# Records → labels → examples
# ---------------------------------------------------------------------------------------------
def resolve_task(task: str, kind: str, path: str) -> str:
    """``classify.task``, or the data's when ``auto``; a mismatch is a ConfigError naming both."""
    data_task = TASK_OF_KIND[kind]
    if task not in ("auto", data_task):
        fields = "text, label" if kind == "labelled" else "tokens, tags"
        raise ConfigError(f"classify.task={task}, but {path} holds {kind} records ({fields}), which train {data_task}; "
                          f"set classify.task={data_task} or auto")
    return data_task


def label_names_of(rows: Sequence[Row], kind: str) -> list[str]:
    """The classes the model will predict, from the training data, in a fixed order.

    Labels: sorted (integer labels numerically, so class ids 0..K−1 keep their ids). Tags: ``O``
    first, then ``B-X``, ``I-X`` for each entity type X in sorted order (both, even where the data
    never has an ``I-X``: a longer entity may need it), then any other tags sorted.
    """
    if kind == "labelled":
        values = {row.fields["label"] for row in rows}
        if all(isinstance(v, int) for v in values):
            return [str(v) for v in sorted(values)]
        return sorted(str(v) for v in values)
    tags = {tag for row in rows for tag in row.fields["tags"]}
    types = sorted({tag[2:] for tag in tags if tag[:2] in ("B-", "I-")})
    others = sorted(tag for tag in tags if tag != "O" and tag[:2] not in ("B-", "I-"))
    return ["O", *(f"{p}-{t}" for t in types for p in ("B", "I")), *others]


def trained_label_names(model: ModelConfig, names: list[str]) -> list[str]:
    """The labels of a classifier trained further: its own, in its order, when they include every
    label of the data (data from feedback on it may lack a class: its head keeps that class);
    otherwise the data's ``names``."""
    from transformers import AutoConfig

    path = resolve_backbone(model).name_or_path
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError):
        return names  # not readable here: load_classifier_backbone names the problem
    if not any(a.endswith("Classification") for a in config.architectures or []):
        return names
    theirs = [str(config.id2label[i]) for i in range(len(config.id2label))]
    return theirs if set(names) <= set(theirs) else names


def check_known_labels(rows: Sequence[Row], kind: str, names: Sequence[str], train_path: str) -> None:
    """Every held-out label must be one the model learns; the first that is not names its place."""
    known = set(names)
    for row in rows:
        if kind == "labelled":
            if str(row.fields["label"]) not in known:
                raise DataError(f"{row.where}: field 'label' is {row.fields['label']!r}, a label the training data "
                                f"({train_path}) never has; its labels: {', '.join(names)}")
            continue
        for i, tag in enumerate(row.fields["tags"]):
            if tag not in known:
                raise DataError(f"{row.where}: field 'tags[{i}]' is {tag!r}, a tag the training data ({train_path}) "
                                f"never has; its tags: {', '.join(names)}")


def encode_rows(path: str, rows: Sequence[Row], task: str, tokenizer: Any, label_ids: dict[str, int], max_length: int,
                cfg: ClassifyConfig) -> list[ClassifierExample]:
    """Tokenise ``rows`` for the backbone; a row longer than ``max_length`` sub-tokens is cut there,
    counted and logged (``data.overlong=drop`` leaves it out, ``error`` stops at it)."""
    if task == "classification":
        batch = tokenizer([row.fields["text"] for row in rows], truncation=True, max_length=max_length,
                          return_overflowing_tokens=True)
    else:
        batch = tokenizer([row.fields["tokens"] for row in rows], is_split_into_words=True, truncation=True,
                          max_length=max_length, return_overflowing_tokens=True)
    if "overflow_to_sample_mapping" not in batch:
        raise ModelError(f"model.name_or_path: the tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer, "
                         "which classify needs to cut and count long rows; use a model with a tokenizer.json")
    # A row longer than max_length comes back as several pieces; its first piece is what the model reads.
    first_piece: dict[int, int] = {}
    for piece, i in enumerate(batch["overflow_to_sample_mapping"]):
        first_piece.setdefault(int(i), piece)
    pieces = Counter(int(i) for i in batch["overflow_to_sample_mapping"])
    examples, cut, words_cut = [], 0, 0
    for i, row in enumerate(rows):
        piece = first_piece[i]
        if pieces[i] > 1:
            if cfg.data.overlong == "error":
                raise DataError(f"{row.where}: longer than data.max_length={max_length} sub-tokens; raise it, "
                                f"or set data.overlong=truncate (cut and counted) or drop")
            cut += 1
            if cfg.data.overlong == "drop":
                continue
        ids = batch["input_ids"][piece]
        if task == "classification":
            examples.append(ClassifierExample(ids, label_ids[str(row.fields["label"])], [], row))
            continue
        labels, positions, previous = [IGNORE_INDEX] * len(ids), [], None
        tags = row.fields["tags"]
        for position, word in enumerate(batch.word_ids(piece)):
            if word is not None and word != previous:
                labels[position] = label_ids[tags[word]]
                positions.append(position)
            elif word is not None and cfg.classify.label_all_subtokens:
                tag = tags[word]  # a word's later pieces continue its entity: B-X becomes I-X
                labels[position] = label_ids.get("I-" + tag[2:], label_ids[tag]) if tag.startswith("B-") else label_ids[tag]
            previous = word
        words_cut += len(tags) - len(positions)
        examples.append(ClassifierExample(ids, labels, positions, row))
    if cut:
        what = f" ({words_cut} words past the cut carry no loss)" if task == "ner" else ""
        action = "left out" if cfg.data.overlong == "drop" else "cut to their first"
        log.info("%s: %d of %d rows were longer than data.max_length=%d sub-tokens and were %s %d%s",
                 path, cut, len(rows), max_length, action, max_length, what)
    if not examples:
        raise DataError(f"{path}: no row is left within data.max_length={max_length}")
    return examples


# ---------------------------------------------------------------------------------------------
# Bandit feedback → examples
# ---------------------------------------------------------------------------------------------
def run_bandit_classify(cfg: ClassifyConfig) -> Run:
    """``classify.objective=bandit``: feedback on the logging classifier's predictions, that
    classifier as the start, its label names kept; then the same loop as supervised training."""
    c = cfg.classify
    rows, _ = load_records(cfg.data.path, ("bandit",), cfg.data.max_samples)
    task = bandit_task(rows, c.task, cfg.data.path)
    if c.class_weights != "none":
        raise ConfigError("classify.class_weights weighs labels; verdicts have none (the estimator weighs each row by its "
                          "propensity): set classify.class_weights=none with objective=bandit")
    if task == "ner" and BANDIT_LOSSES[c.bandit_loss].needs_classes:
        raise ConfigError(f"classify.bandit_loss={c.bandit_loss} needs every alternative output's probability, which an "
                          "entity span does not enumerate; use banditnet or clipped_ips for NER")
    backbone = resolve_backbone(cfg.model)
    names = logging_label_names(backbone, task)
    label_ids = {name: i for i, name in enumerate(names)}
    tokenizer = load_tokenizer(backbone)
    model = load_classifier_backbone(backbone, task, names, cfg.train.seed)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    max_length = resolve_max_length(cfg.data, model)
    train = encode_bandit_rows(cfg, rows, task, tokenizer, label_ids, max_length)
    if BANDIT_LOSSES[c.bandit_loss].needs_classes:
        # r̂(x, a) = the logging classifier's P(a | x): its own belief that a user would confirm a.
        # The model has not trained yet, so it is the logging classifier.
        model.eval()
        probs = label_probabilities(model, tokenizer, [e.source.fields["text"] for e in train], cfg.train.batch_size,
                                    max_length)
        for e, p in zip(train, probs.tolist()):
            e.estimates = p
    supervised = None
    if c.supervised_path:
        supervised_rows, supervised_kind = load_records(c.supervised_path, SUPERVISED_KINDS)
        if TASK_OF_KIND[supervised_kind] != task:
            raise DataError(f"{c.supervised_path}: {supervised_kind} records, but the feedback in {cfg.data.path} is on {task}")
        check_known_labels(supervised_rows, supervised_kind, names, f"the logging model {backbone.name_or_path}")
        supervised = encode_rows(c.supervised_path, supervised_rows, task, tokenizer, label_ids, max_length, cfg)
    held: list[ClassifierExample] = []
    held_rows: list[Row] = []
    if cfg.data.eval_path:  # scores need the truth: labelled records, not more feedback
        held_rows, held_kind = load_records(cfg.data.eval_path, SUPERVISED_KINDS)
        if TASK_OF_KIND[held_kind] != task:
            raise DataError(f"{cfg.data.eval_path}: {held_kind} records, but the feedback in {cfg.data.path} is on {task}")
        check_known_labels(held_rows, held_kind, names, f"the logging model {backbone.name_or_path}")
        held = encode_rows(cfg.data.eval_path, held_rows, task, tokenizer, label_ids, max_length, cfg)
    log.info("classify: %s from %d bandit verdicts (%.0f%% correct, %d with a named label) on %s; estimator %s",
             task, len(train), 100 * sum(e.reward for e in train) / len(train), sum(e.target is not None for e in train),
             backbone.name_or_path, BANDIT_LOSSES[c.bandit_loss].title)
    return fit_classifier(cfg, model, tokenizer, task, names, train, held, held_rows, max_length, supervised)


def bandit_task(rows: Sequence[Row], task: str, path: str) -> str:
    """classification (rows with ``text``) or ner (``tokens, start, end``); every row the same."""
    data_task = "classification" if rows[0].fields.get("text") is not None else "ner"
    for row in rows:
        if (row.fields.get("text") is not None) != (data_task == "classification"):
            field, first = ("text", "text") if data_task == "ner" else ("tokens", "text")
            raise DataError(f"{row.where}: field '{field}': this row is {'an NER entity' if field == 'tokens' else 'a text'}, "
                            f"but {path}'s first row has {first if data_task == 'classification' else 'tokens'}; one file holds one task")
    if task not in ("auto", data_task):
        raise ConfigError(f"classify.task={task}, but {path} holds feedback on {data_task}; set classify.task={data_task} or auto")
    return data_task


def logging_label_names(backbone: ModelConfig, task: str) -> list[str]:
    """The label names of the classifier that served the predictions (its ``config.id2label``)."""
    from transformers import AutoConfig

    from alignloop.models.load import _check_reachable, _first_line

    _check_reachable(backbone.name_or_path, "model.name_or_path")
    try:
        config = AutoConfig.from_pretrained(backbone.name_or_path, trust_remote_code=backbone.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name_or_path {backbone.name_or_path!r}: cannot read its config ({_first_line(e)})") from None
    wanted = "TokenClassification" if task == "ner" else "SequenceClassification"
    if not any(a.endswith(wanted) for a in config.architectures or []):
        raise ConfigError(f"model.name_or_path {backbone.name_or_path!r} is not a trained {task} classifier; "
                          "classify.objective=bandit starts from the model that served the predictions (its final/ folder)")
    return [str(config.id2label[i]) for i in range(len(config.id2label))]


def encode_bandit_rows(cfg: ClassifyConfig, rows: Sequence[Row], task: str, tokenizer: Any, label_ids: dict[str, int],
                       max_length: int) -> list[ClassifierExample]:
    """Encode feedback rows as examples whose ``label`` is the shown output and ``target`` the named one.

    Each row is encoded as the supervised record it would be if the shown output were the label
    (NER: the shown type's B-/I- tags on the entity's words), by :func:`encode_rows`, so the
    sub-word alignment and the length rule are the supervised ones. NER keeps the tags on the
    entity's words only: the verdict says nothing about the rest of the sentence."""
    path = cfg.data.path
    shown_rows, target_rows = [], []
    for row in rows:
        f = row.fields
        if task == "classification":
            shown_rows.append(Row({"text": f["text"], "label": bandit_label(row, "shown", label_ids)}, row.where))
            if f.get("label") is not None:
                target_rows.append(Row({"text": f["text"], "label": bandit_label(row, "label", label_ids)}, row.where))
            continue
        shown_rows.append(Row({"tokens": f["tokens"], "tags": span_tags(row, "shown", label_ids)}, row.where))
        if f.get("label") is not None:
            target_rows.append(Row({"tokens": f["tokens"], "tags": span_tags(row, "label", label_ids)}, row.where))
    examples = encode_rows(path, shown_rows, task, tokenizer, label_ids, max_length, cfg)
    # which feedback row each encoding came from (encode_rows may leave rows out: data.overlong=drop)
    row_of = {id(r): i for i, r in enumerate(shown_rows)}
    named_rows = [i for i, r in enumerate(rows) if r.fields.get("label") is not None]
    named_of = {id(r): named_rows[j] for j, r in enumerate(target_rows)}
    encoded_targets = encode_rows(path, target_rows, task, tokenizer, label_ids, max_length, cfg) if target_rows else []
    targets = {named_of[id(e.source)]: e for e in encoded_targets}
    kept, partial = [], 0
    for e in examples:
        index = row_of[id(e.source)]
        f = rows[index].fields
        target = targets.get(index)
        if task == "ner":
            start, end = f["start"], f["end"]
            if end > len(e.word_positions):  # the entity reaches past max_length: its log π would be partial
                partial += 1
                continue
            span = set(e.word_positions[start:end])
            e.label = [tag if p in span else IGNORE_INDEX for p, tag in enumerate(e.label)]
            if target is not None:
                target.label = [tag if p in span else IGNORE_INDEX for p, tag in enumerate(target.label)]
        e.reward, e.propensity = float(f["reward"]), float(f["propensity"])
        e.target = target.label if target is not None else None
        kept.append(e)
    if partial:
        log.info("%s: %d of %d entities reach past data.max_length=%d sub-tokens and were left out", path, partial, len(rows), max_length)
    if not kept:
        raise DataError(f"{path}: no feedback row is left within data.max_length={max_length}")
    return kept


def bandit_label(row: Row, field: str, label_ids: dict[str, int]) -> str:
    """A classification row's ``shown`` or ``label`` as one of the logging model's label names."""
    value = row.fields[field]
    names = list(label_ids)
    if isinstance(value, int) and str(value) not in label_ids:
        if 0 <= value < len(names):
            return names[value]  # a class id
    if str(value) not in label_ids:
        raise DataError(f"{row.where}: field '{field}' is {value!r}, not one of the logging model's labels ({', '.join(names)})")
    return str(value)


def span_tags(row: Row, field: str, label_ids: dict[str, int]) -> list[str]:
    """An NER row's tags if ``field`` (an entity type, or O) were right on its span; O elsewhere."""
    f = row.fields
    value, start, end = str(f[field]), f["start"], f["end"]
    tags = ["O"] * len(f["tokens"])
    if value != "O":
        tags[start:end] = [f"B-{value}"] + [f"I-{value}"] * (end - start - 1)
    for tag in tags[start:end]:
        if tag not in label_ids:
            types = sorted({name[2:] for name in label_ids if name[:2] in ("B-", "I-")})
            raise DataError(f"{row.where}: field '{field}' is {value!r}, not an entity type of the logging model "
                            f"({', '.join(types)}{'' if field == 'shown' else ', or O'})")
    return tags


def load_classifier_backbone(backbone: ModelConfig, task: str, names: list[str], seed: int) -> Any:
    """The backbone with a new, seeded head over ``names`` (a head with the same labels is kept, so a
    trained classifier can be trained further); LoRA adapters when ``model.lora.r > 0``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from alignloop.models.load import DTYPES, _check_reachable, _first_line, add_lora

    _check_reachable(backbone.name_or_path, "model.name_or_path")
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForTokenClassification
    try:
        config = AutoConfig.from_pretrained(backbone.name_or_path, trust_remote_code=backbone.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name_or_path {backbone.name_or_path!r}: cannot read its config ({_first_line(e)})") from None
    is_classifier = any(a.endswith("Classification") for a in config.architectures or [])
    theirs = [str(config.id2label[i]) for i in range(len(config.id2label))] if is_classifier else []
    if is_classifier and theirs != names and len(theirs) == len(names):
        # Same size, other labels: transformers would keep the head and silently rename its outputs.
        raise ModelError(f"model.name_or_path {backbone.name_or_path!r} already predicts {', '.join(theirs)}; the data's labels "
                         f"are {', '.join(names)}. Start from its base model, or give the data its label names")
    torch.manual_seed(seed)  # the new head's initialisation
    try:
        model = auto.from_pretrained(
            backbone.name_or_path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)}, ignore_mismatched_sizes=True,
            dtype=DTYPES[backbone.dtype], trust_remote_code=backbone.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name_or_path {backbone.name_or_path!r}: cannot load as a "
                         f"{auto.__name__.removeprefix('AutoModelFor')} model ({_first_line(e)})") from None
    if backbone.gradient_checkpointing:
        from alignloop.models.load import enable_checkpointing

        enable_checkpointing(model)
    if backbone.lora.r > 0:
        model = add_lora(model, backbone, task_type="SEQ_CLS" if task == "classification" else "TOKEN_CLS")
    return model


def class_weights(examples: Sequence[ClassifierExample], num_classes: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights, N / (K × count_c) over the labels that carry loss; a class
    the training data lacks gets 1 (it is never a target, so its weight never counts)."""
    counts = torch.zeros(num_classes)
    for e in examples:
        labels = torch.tensor(e.label if isinstance(e.label, list) else [e.label])
        counts += torch.bincount(labels[labels != IGNORE_INDEX], minlength=num_classes).float()
    present = counts > 0
    weights = torch.ones(num_classes)
    weights[present] = counts.sum() / (int(present.sum()) * counts[present])
    return weights


def collate_examples(examples: Sequence[ClassifierExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ((B,) or (B, T) with IGNORE_INDEX on padding);
    bandit examples add ``reward``, ``propensity`` (B,), ``target`` (shaped as labels, IGNORE_INDEX where no
    label was named), ``named`` (B,) bool and, for doubly_robust, ``estimates`` (B, K)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    token_level = isinstance(examples[0].label, list)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if token_level else \
        torch.tensor([e.label for e in examples], dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention_mask[i, :n] = 1
        if token_level:
            labels[i, :n] = torch.tensor(e.label)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if examples[0].reward is None:
        return batch
    target = torch.full_like(labels, IGNORE_INDEX)
    for i, e in enumerate(examples):
        if e.target is not None:
            if token_level:
                target[i, :len(e.target)] = torch.tensor(e.target)
            else:
                target[i] = e.target
    batch.update(reward=torch.tensor([e.reward for e in examples]), propensity=torch.tensor([e.propensity for e in examples]),
                 target=target, named=torch.tensor([e.target is not None for e in examples]))
    if examples[0].estimates is not None:
        batch["estimates"] = torch.tensor([e.estimates for e in examples])
    return batch


def padding_share(examples: Sequence[ClassifierExample], batches: Sequence[Sequence[int]]) -> float:
    """The share of batch positions that are padding when ``batches`` (lists of indices) are padded to their longest."""
    total = real = 0
    for batch in batches:
        lengths = [len(examples[i].input_ids) for i in batch]
        total += max(lengths) * len(lengths)
        real += sum(lengths)
    return 1 - real / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def fit_classifier(cfg: ClassifyConfig, model: Any, tokenizer: Any, task: str, names: list[str],
                   train: list[ClassifierExample], held_out: list[ClassifierExample], held_rows: list[Row],
                   max_length: int, supervised: list[ClassifierExample] | None = None) -> Run:
    cfg, run = open_stage_run(cfg, len(train), "classify")
    if run.is_complete():
        return run
    t = cfg.train
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    weights = class_weights(train, len(names)) if cfg.classify.class_weights == "balanced" else None
    with TrainingSession(cfg, model, run, "classify") as session:
        model, accelerator = session.model, session.accelerator
        if weights is not None:
            weights = weights.to(accelerator.device)
            log.info("classify: balanced class weights %s", ", ".join(f"{n} {w:.2f}" for n, w in zip(names, weights.tolist())))
        lengths = [len(e.input_ids) for e in train]
        batches = ShuffledBatches(len(train), t.batch_size, t.seed, accelerator.process_index, accelerator.num_processes,
                                  lengths=lengths)
        random_order = ShuffledBatches(len(train), t.batch_size, t.seed)  # the same batches without buckets, to compare
        objective = STEP_LOSSES[cfg.classify.objective]
        # objective=bandit with classify.supervised_path: one batch of the labelled set beside each feedback batch
        supervised_batches = ShuffledBatches(len(supervised), min(t.batch_size, len(supervised)), t.seed + 1) if supervised else None
        epoch = range(batches.batches_per_epoch)
        log.info("classify: %d training / %d held-out rows, %d steps of %d×%d×%d; padding in the first epoch's batches: "
                 "%.1f%% with length buckets (%.1f%% in random batches); run folder %s",
                 len(train), len(held_out), t.max_steps, t.batch_size, t.grad_accum, accelerator.num_processes,
                 100 * padding_share(train, [batches.indices(k) for k in epoch]),
                 100 * padding_share(train, [random_order.indices(k) for k in epoch]), run.dir)
        while session.running:
            started = time.perf_counter()
            model.train()
            examples = [[train[i] for i in batches.indices(session.step * t.grad_accum + k)] for k in range(t.grad_accum)]
            micro_batches = [{k: v.to(accelerator.device) for k, v in collate_examples(b, pad_id).items()} for b in examples]
            # One normaliser for the whole step, all processes (the objective's: the weighted count
            # of labels that carry loss, or the feedback rows), so a step's loss is its mean
            # whatever the accumulation or process count.
            step_weight = session.sum_over_processes(sum(objective.weight(b, weights) for b in micro_batches))
            sums: Counter = Counter()
            padded = positions = 0.0
            for k, batch in enumerate(micro_batches):
                last = k == len(micro_batches) - 1
                context = StepContext(cfg, weights)
                if supervised_batches is not None:
                    chosen = [supervised[i] for i in supervised_batches.indices(session.step * t.grad_accum + k)]
                    context.supervised = {k: v.to(accelerator.device) for k, v in collate_examples(chosen, pad_id).items()}
                with session.accumulating(last):
                    with session.autocast():
                        summed, batch_sums = objective.loss(model, batch, context)
                    session.backward(summed / (step_weight / accelerator.num_processes))
                sums.update(batch_sums)
                positions += batch["attention_mask"].numel()
                padded += float((batch["attention_mask"] == 0).sum())
            record = {
                **objective.summarise({k: session.sum_over_processes(v) for k, v in sums.items()}, step_weight),
                "train/padding": session.sum_over_processes(padded) / session.sum_over_processes(positions),
                "train/tokens": session.sum_over_processes(positions - padded),
                **session.optimizer_step(),
            }
            evaluate = (lambda: evaluate_classifier(model, task, names, held_out, t.batch_size, pad_id, weights,
                                                    t.eval_batches)) if held_out else None
            session.end_step(record, started, evaluate)
        session.save_final(tokenizer)
    if accelerator.is_main_process:
        extra = final_report(run, accelerator.unwrap_model(model), tokenizer, task, names, held_rows,
                             t.batch_size, max_length) if held_rows else "No held-out data: no classification report."
        ylabel = "cross-entropy (nats/label)" if cfg.classify.objective == "supervised" else "feedback objective"
        write_training_report(run, "classify", extra=extra, ylabel=ylabel, table=REPORT_TABLE[task])
    log.info("classify done: model in %s, report in %s", run.final_dir, run.dir / "report.md")
    return run


@dataclass
class StepContext:
    """What a step loss reads beside its batch."""

    cfg: ClassifyConfig
    weights: torch.Tensor | None  # class weights (classify.class_weights=balanced), or None
    supervised: dict[str, torch.Tensor] | None = None  # objective=bandit: a batch of classify.supervised_path


def supervised_loss(model: Any, batch: dict[str, torch.Tensor], context: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy summed over the labels that carry loss (IGNORE_INDEX skipped), each weighted by
    its class (1 without class weights); the loop divides by the step's total weight, so the step's
    loss is the weighted mean of −log p(label)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)
    summed = F.cross_entropy(logits, labels, weight=context.weights, ignore_index=IGNORE_INDEX, reduction="sum")
    scored = labels != IGNORE_INDEX
    return summed, {"loss": float(summed.detach()), "correct": float((logits.detach().argmax(-1)[scored] == labels[scored]).sum()),
                    "counted": float(scored.sum())}


def label_logps(class_logps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π_θ of each row's labels (B,): class_logps (B, K) with labels (B,), or (B, T, K) with
    labels (B, T) summed over the positions that are not IGNORE_INDEX (an NER entity: its words'
    log-probabilities of its tags, read at each word's first sub-token). 0 where a row has none."""
    keep = labels != IGNORE_INDEX
    picked = class_logps.gather(-1, torch.where(keep, labels, torch.zeros_like(labels)).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(keep, picked, torch.zeros_like(picked))
    return picked if picked.dim() == 1 else picked.sum(dim=1)


def bandit_feedback_loss(model: Any, batch: dict[str, torch.Tensor], context: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
    """The feedback objective (:func:`alignloop.losses.feedback_objective`) of one micro-batch of
    verdicts, times its row count: the loop divides by the step's rows."""
    c = context.cfg.classify
    bandit = BANDIT_LOSSES[c.bandit_loss]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    class_logps = torch.log_softmax(logits.float(), dim=-1)  # (B, K), ner (B, T, K)
    extra = {}
    if bandit.needs_classes:
        extra = {"class_logps": class_logps, "shown": batch["labels"], "reward_estimates": batch["estimates"]}
    bandit_loss, metrics = bandit.loss(label_logps(class_logps, batch["labels"]), batch["propensity"], batch["reward"],
                                       **extra, **{name: getattr(c, name) for name in bandit.settings})
    supervised_logps = None
    if context.supervised is not None:
        sup = context.supervised
        sup_logits = model(input_ids=sup["input_ids"], attention_mask=sup["attention_mask"]).logits
        sup_logps = torch.log_softmax(sup_logits.float(), dim=-1)
        scored = sup["labels"] != IGNORE_INDEX  # ner: every tagged word is one term of the mean
        supervised_logps = sup_logps.gather(-1, torch.where(scored, sup["labels"], 0).unsqueeze(-1)).squeeze(-1)[scored]
    loss, parts = feedback_objective(bandit_loss, label_logps(class_logps, batch["target"]), batch["named"],
                                     supervised_logps, c.alpha, c.label_weight)
    rows = float(batch["reward"].numel())
    # row-weighted sums, so a step's numbers are means over its rows (NaN parts, e.g. no named label, left out)
    sums = {k: v * rows for k, v in {**metrics, **parts}.items() if v == v}
    return loss * rows, {"loss": float(loss.detach()) * rows, "rows": rows, **sums}


def supervised_summary(sums: dict[str, float], step_weight: float) -> dict[str, float]:
    return {"train/loss": sums["loss"] / step_weight, "train/accuracy": sums["correct"] / max(sums["counted"], 1.0)}


def feedback_summary(sums: dict[str, float], step_weight: float) -> dict[str, float]:
    return {"train/loss": sums["loss"] / step_weight,
            **{f"train/{k}": v / sums["rows"] for k, v in sums.items() if k not in ("loss", "rows")}}


@dataclass(frozen=True)
class StepLoss:
    """One ``classify.objective``: the loop's per-batch loss, its share of the step's normaliser,
    and how the step's summed numbers become logged means."""

    loss: Any  # (model, batch, StepContext) -> (summed loss, additive numbers for the log)
    weight: Any  # (batch, class weights) -> this micro-batch's share of the step's normaliser
    summarise: Any  # (summed numbers over the step, step normaliser) -> metrics


STEP_LOSSES = {
    "supervised": StepLoss(supervised_loss, lambda batch, weights: float(loss_weight(batch["labels"], weights)), supervised_summary),
    "bandit": StepLoss(bandit_feedback_loss, lambda batch, weights: float(batch["reward"].numel()), feedback_summary),
}


def loss_weight(labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The summed class weight of the labels that carry loss (their count without weights)."""
    scored = labels[labels != IGNORE_INDEX]
    return weights[scored].sum() if weights is not None else torch.tensor(float(scored.numel()))


@torch.no_grad()
def evaluate_classifier(model: Any, task: str, names: list[str], held_out: Sequence[ClassifierExample], batch_size: int,
                        pad_id: int, weights: torch.Tensor | None, limit: int | None) -> dict[str, float]:
    """Held-out loss (weighted as in training), accuracy and the headline F1 on up to ``limit``
    batches, sorted by length so batches are little padding. NER reads each word at its first
    sub-token, as evaluation does; words past max_length are left out here (the final report counts them)."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(held_out)), key=lambda i: len(held_out[i].input_ids))
    if limit and limit * batch_size < len(order):  # an even spread over the lengths, still sorted
        order = [order[k * len(order) // (limit * batch_size)] for k in range(limit * batch_size)]
    loss_sum = weight_sum = 0.0
    gold: list = []
    predicted: list = []
    for start in range(0, len(order), batch_size):
        chunk = [held_out[i] for i in order[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate_examples(chunk, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), weight=weights,
                                          ignore_index=IGNORE_INDEX, reduction="sum"))
        weight_sum += float(loss_weight(batch["labels"], weights))
        ids = logits.argmax(-1).tolist()
        for row, e in enumerate(chunk):
            if task == "classification":
                gold.append(names[e.label])
                predicted.append(names[ids[row]])
            else:
                gold.append([names[e.label[p]] for p in e.word_positions])
                predicted.append([names[ids[row][p]] for p in e.word_positions])
    if task == "classification":
        report = reports.classification_report_labels(gold, predicted, labels=names)
        scores = {"eval/accuracy": report["accuracy"], "eval/macro_f1": report["macro_f1"]}
    else:
        report = reports.ner_report(gold, predicted)
        scores = {"eval/micro_f1": report["micro_f1"], "eval/macro_f1": report["macro_f1"], "eval/accuracy": report["accuracy"]}
    return {"eval/loss": loss_sum / max(weight_sum, 1e-12), **scores}


def final_report(run: Run, model: Any, tokenizer: Any, task: str, names: list[str], rows: Sequence[Row],
                 batch_size: int, max_length: int) -> str:
    """The held-out report of ``alignloop evaluate --task`` on the final model: ``metrics.json``,
    ``confusion_matrix.png`` in the run folder; returns the markdown for ``report.md``."""
    model.eval()
    if task == "classification":
        probs = label_probabilities(model, tokenizer, [r.fields["text"] for r in rows], batch_size, max_length)
        predicted = [names[i] for i in probs.argmax(-1).tolist()]
        report, _, plots = reports.report_labels([str(r.fields["label"]) for r in rows], predicted, names, run.dir)
    else:
        probs, cut = word_tag_probabilities(model, tokenizer, [r.fields["tokens"] for r in rows], batch_size, max_length)
        predicted = [[names[i] for i in p.argmax(-1).tolist()] for p in probs]
        report, _, plots = reports.report_tags([r.fields["tags"] for r in rows], predicted, names, run.dir)
        report["words_past_max_length"] = cut
    (run.dir / "metrics.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return "\n".join([
        "## Held-out classification report",
        "",
        reports.classification_verdict(report),
        "",
        *reports.per_class_table(report),
        "",
        *markdown_images(run.dir, plots),
        "Every number: `metrics.json`; the same report as `alignloop evaluate --task "
        f"{task} --candidate {run.final_dir}` on these rows.",
    ])
