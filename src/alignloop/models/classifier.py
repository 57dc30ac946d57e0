"""Sequence and token classifiers at inference: loading, class probabilities, word alignment, BIO spans.

Any HF ``AutoModelForSequenceClassification`` ("classification": one label per text) or
``AutoModelForTokenClassification`` ("ner": one BIO tag per word) folder or id. Training
(``train/classify.py``), evaluation (``evaluate/classifier.py``) and serving read a model through
these functions, so all three see the same probabilities for the same input.

NER words are split into sub-tokens by the model's (fast) tokenizer; a word's distribution is the one
at its first sub-token (as it was trained: the other sub-tokens carry no label). Words past
``max_length`` sub-tokens get a one-hot ``O`` and are counted.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from alignloop.errors import ModelError

TASKS = ("classification", "ner")
_WORD = re.compile(r"\w+|[^\w\s]")


def classifier_task(path_or_model: Any) -> str:
    """``"classification"`` or ``"ner"``: what a saved model (folder, Hub id) or a loaded one predicts,
    read from ``config.architectures`` (``*ForTokenClassification`` is NER) or the model's class."""
    if isinstance(path_or_model, str):
        from transformers import AutoConfig

        from alignloop.models.load import _check_reachable, _first_line

        _check_reachable(path_or_model, "classifier")
        try:
            architectures = AutoConfig.from_pretrained(path_or_model).architectures or []
        except (OSError, ValueError) as e:
            raise ModelError(f"classifier {path_or_model!r}: cannot read its config ({_first_line(e)})") from None
    else:
        model = getattr(path_or_model, "base_model", path_or_model) if hasattr(path_or_model, "peft_config") else path_or_model
        architectures = [type(getattr(model, "model", model)).__name__, type(model).__name__]
    for name in architectures:
        if name.endswith("ForTokenClassification"):
            return "ner"
        if name.endswith("ForSequenceClassification"):
            return "classification"
    raise ModelError(f"classifier {path_or_model if isinstance(path_or_model, str) else type(path_or_model).__name__!r}: "
                     f"architectures {architectures} name neither a sequence nor a token classifier")


def load_classifier(path: str, task: str | None, role: str) -> tuple[Any, Any]:
    """A sequence or token classifier and its tokenizer, in eval mode on the inference device.

    ``task`` None reads it from the model (:func:`classifier_task`); ``role`` names the model in errors.
    """
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    from alignloop.models.load import _check_reachable, _first_line, inference_device

    _check_reachable(path, role)
    task = task or classifier_task(path)
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


def outside_index(names: Sequence[str]) -> int:
    """The class a word past ``max_length`` gets: ``O`` when the model has it, else class 0."""
    return names.index("O") if "O" in names else 0


@torch.inference_mode()
def label_probabilities(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int) -> torch.Tensor:
    """(N, K) softmax over the model's classes for each text, on the CPU, in the order given.

    Texts are batched by length (sorted by characters) so little of each batch is padding; a text
    longer than ``max_length`` sub-tokens is read from its first ``max_length``.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    probs = torch.zeros(len(texts), model.config.num_labels)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in chunk], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt").to(model.device)
        probs[chunk] = model(**batch).logits.float().softmax(-1).cpu()
    return probs


@torch.inference_mode()
def word_tag_probabilities(model: Any, tokenizer: Any, sentences: Sequence[list[str]], batch_size: int,
                           max_length: int) -> tuple[list[torch.Tensor], int]:
    """Each sentence's (words, K) tag distribution, read at each word's first sub-token, on the CPU.

    Returns the distributions and how many words lay past ``max_length`` sub-tokens: those get a
    one-hot ``O`` (class 0 when the model has no ``O``), so every word has a row.
    """
    names = label_names(model)
    outside = torch.nn.functional.one_hot(torch.tensor(outside_index(names)), len(names)).float()
    result: list[torch.Tensor] = [torch.empty(0, len(names)) for _ in sentences]
    cut = 0
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer([sentences[i] for i in chunk], is_split_into_words=True, truncation=True,
                          max_length=max_length, padding=True, return_tensors="pt")
        probs = model(**batch.to(model.device)).logits.float().softmax(-1).cpu()
        for row, i in enumerate(chunk):
            first_piece: dict[int, int] = {}
            for position, word in enumerate(batch.word_ids(row)):
                if word is not None and word not in first_piece:
                    first_piece[word] = position
            # Truncation cuts the end, so the words that fit are the first len(first_piece).
            kept = probs[row, list(first_piece.values())]
            missing = len(sentences[i]) - len(first_piece)
            cut += missing
            result[i] = torch.cat([kept, outside.expand(missing, -1)]) if missing else kept
    return result, cut


def split_words(text: str) -> list[tuple[str, int, int]]:
    """``(word, start_char, end_char)`` for each word of an NER input given as one string: runs of
    word characters, and each other non-space character alone (so "Paris," is "Paris" and ",")."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(type, word_start, word_end)`` (end exclusive) for each entity of a BIO tag sequence.

    The conlleval rule, as seqeval with ``mode=None``: an entity starts at ``B-X``, or at ``I-X``
    after ``O`` or after another type (a stray I- is kept, not dropped); it ends before ``O``,
    ``B-`` or a change of type. A tag with no ``B-``/``I-`` prefix other than ``O`` counts as
    ``I-`` of itself (IO tagging).
    """
    spans = []
    kind, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):  # a trailing O closes the last entity
        prefix, name = (tag[:1], tag[2:]) if tag[:2] in ("B-", "I-") else (None if tag == "O" else "I", tag)
        if kind is not None and (prefix != "I" or name != kind):
            spans.append((kind, start, i))
            kind = None
        if prefix is not None and kind is None:
            kind, start = name, i
    return spans
