"""A served classifier and one /v1/classify request apart from HTTP: the inputs checked, the
model's probabilities, the exploration policy's choice with its propensity, and the stored
predictions.

Truncation rule: a classifier reads at most ``max_tokens`` sub-tokens (``--classify-max-tokens``,
else the model's own limit). A longer text is read from its start; an NER input's words past the
limit are shown as ``O`` with propensity 1 (the model did not read them, so nothing is explored
there). Each result's ``truncated_words`` counts the words (as :func:`split_words` splits a text)
the model did not see, so a client can tell a judged answer on a cut input.
"""

from __future__ import annotations

import math
import secrets
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from alignloop.config import ServeConfig
from alignloop.feedback.store import PredictionRecord, User
from alignloop.models.classifier import (
    classifier_task,
    entity_spans,
    label_names,
    label_probabilities,
    load_classifier,
    split_words,
    word_tag_probabilities,
)
from alignloop.rollout.exploration import Exploration, choose
from alignloop.serve.engine import model_version
from alignloop.serve.errors import ApiError

BATCH_SIZE = 32
DEFAULT_MAX_TOKENS = 512  # for a model that states no limit: BERT's


class ServedClassifier:
    """One classifier behind /v1/classify: ``name``, ``version`` (the content hash of its
    weights, as for chat models), ``task`` and ``labels``. Stateless between requests, so a
    redeploy is a swap of the object: requests holding the old one finish on it."""

    def __init__(self, name: str, path: str, device: str | None = None, max_tokens: int | None = None) -> None:
        self.name, self.path = name, path
        self.task = classifier_task(path)
        self.model, self.tokenizer = load_classifier(path, self.task, f"classifier {name!r}")
        if device is not None:
            self.model.to(device)
        self.labels = label_names(self.model)
        self.version = model_version(self.model)
        self.max_tokens = max_tokens or _model_limit(self.model, self.tokenizer)
        # Requests run in parallel worker threads, and a fast tokenizer keeps its padding and
        # truncation settings in shared Rust state that each call sets and then encodes under
        # (GIL released): one request's unpadded call can switch padding off in the middle of
        # another's batch. One request at a time per classifier; on a CPU the forward pass gains
        # nothing from running two at once anyway.
        self.lock = threading.Lock()

    @classmethod
    def from_config(cls, name: str, path: str, config: ServeConfig) -> ServedClassifier:
        return cls(name, path, device=config.device, max_tokens=config.classify_max_tokens)

    def card_fields(self) -> dict:
        return {"task": self.task, "labels": self.labels}


def _model_limit(model: Any, tokenizer: Any) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]  # HF says 1e30 for "no limit"
    return min(limits) if limits else DEFAULT_MAX_TOKENS


@dataclass
class Inputs:
    """A request's inputs as the model reads them: texts, or NER word lists with each word's
    character span in ``texts[i]``."""

    texts: list[str]
    words: list[list[str]] | None  # NER only
    spans: list[list[tuple[int, int]]] | None  # NER only


def read_inputs(served: ServedClassifier, raw: Any, limit: int) -> Inputs:
    """The body's ``input`` (a text, texts, or word lists for NER) checked; an ApiError (422)
    names ``input`` for anything the model cannot take."""
    if isinstance(raw, str):
        raw = [raw]
    texts_or_words = isinstance(raw, list) and all(
        isinstance(item, str) or (isinstance(item, list) and all(isinstance(w, str) for w in item)) for item in raw)
    if not texts_or_words:
        raise ApiError(422, "input must be a text, a list of texts, or (NER) a list of word lists", param="input")
    if not raw:
        raise ApiError(422, "input is empty: give a text, a list of texts, or (NER) a list of word lists", param="input")
    if len(raw) > limit:
        raise ApiError(422, f"input has {len(raw)} items; this server classifies at most {limit} per request", param="input")
    pretokenised = isinstance(raw[0], list)
    if any(isinstance(item, list) != pretokenised for item in raw):
        raise ApiError(422, "input mixes texts and word lists; send one kind per request", param="input")
    if pretokenised and served.task != "ner":
        raise ApiError(422, f"input: model {served.name!r} classifies whole texts; send strings, not lists of words "
                       "(word lists are for NER models)", param="input")
    for i, item in enumerate(raw):
        if any("\x00" in text for text in (item if pretokenised else [item])):
            raise ApiError(422, f"input[{i}] contains a NUL character (\\u0000), which the store does not hold", param="input")
        words = item if pretokenised else split_words(item)
        if not words or (pretokenised and any(not w or w != w.strip() or " " in w for w in item)):
            what = "a list of non-empty words without spaces" if pretokenised else "a text with at least one word"
            raise ApiError(422, f"input[{i}] must be {what}", param="input")
    if served.task != "ner":
        return Inputs(list(raw), None, None)
    texts, words, spans = [], [], []
    for item in raw:
        if pretokenised:  # offsets into the words joined by single spaces
            starts = [sum(len(w) + 1 for w in item[:j]) for j in range(len(item))]
            texts.append(" ".join(item))
            words.append(list(item))
            spans.append([(s, s + len(w)) for s, w in zip(starts, item)])
        else:
            found = split_words(item)
            texts.append(item)
            words.append([w for w, _, _ in found])
            spans.append([(start, end) for _, start, end in found])
    return Inputs(texts, words, spans)


def classify(served: ServedClassifier, inputs: Inputs, exploration: Exploration, user: User) -> tuple[dict, list[PredictionRecord]]:
    """Run the model, choose what to show, and build the answer and the rows to store. Blocking
    (the forward pass): the route runs it in a worker thread."""
    hex_id = uuid.uuid4().hex
    request_id = f"clsreq-{hex_id}"
    seed = secrets.randbits(63)  # stored with the predictions: what was shown can be redrawn from the probabilities
    generator = torch.Generator().manual_seed(seed)
    stored_exploration = {**exploration.to_json(), "seed": seed}
    with served.lock:
        if served.task == "ner":
            results, records = _tag(served, inputs, exploration, generator)
        else:
            results, records = _label(served, inputs, exploration, generator)
    rows = []
    for i, (result, record) in enumerate(zip(results, records)):
        pid = f"pred-{hex_id}-{i}"
        result["prediction_id"] = pid
        rows.append(PredictionRecord(id=pid, request_id=request_id, user_id=user.id, model_name=served.name,
                                     model_version=served.version, task=served.task, exploration=stored_exploration,
                                     **record))
    # prediction_id first in each result, as the API documents it
    results = [{"prediction_id": r.pop("prediction_id"), **r} for r in results]
    answer = {"id": request_id, "object": "classification", "model": served.name, "model_version": served.version,
              "task": served.task, "exploration": exploration.to_json(), "results": results}
    return answer, rows


def _label(served: ServedClassifier, inputs: Inputs, exploration: Exploration,
           generator: torch.Generator) -> tuple[list[dict], list[dict]]:
    probs = label_probabilities(served.model, served.tokenizer, inputs.texts, BATCH_SIZE, served.max_tokens)
    results, records = [], []
    for text, p in zip(inputs.texts, probs):
        index, propensity = choose(p, exploration, generator)
        shown, best = served.labels[index], served.labels[int(torch.argmax(p))]
        probabilities = {name: float(q) for name, q in zip(served.labels, p)}
        cut = _cut_words(served, text)
        results.append({"label": shown, "best_label": best, "propensity": propensity, "probabilities": probabilities,
                        "truncated_words": cut})
        records.append({"input_text": text, "input_tokens": None, "shown": shown, "best": best, "entities": None,
                        "probabilities": probabilities, "propensity": propensity})
    return results, records


def _tag(served: ServedClassifier, inputs: Inputs, exploration: Exploration,
         generator: torch.Generator) -> tuple[list[dict], list[dict]]:
    assert inputs.words is not None and inputs.spans is not None
    dists, _ = word_tag_probabilities(served.model, served.tokenizer, inputs.words, BATCH_SIZE, served.max_tokens)
    results, records = [], []
    for text, words, spans, p in zip(inputs.texts, inputs.words, inputs.spans, dists):
        seen = _words_seen(served, words)
        outside = "O" if "O" in served.labels else served.labels[0]
        shown, word_propensities = [], []
        for j, row in enumerate(p):
            if j in seen:
                index, propensity = choose(row, exploration, generator)
                shown.append(served.labels[index])
                word_propensities.append(propensity)
            else:  # a word the model did not read: shown O, nothing explored
                shown.append(outside)
                word_propensities.append(1.0)
        best = [served.labels[int(i)] for i in p.argmax(-1)]
        entities = []
        for kind, start, end in entity_spans(shown):
            char_start, char_end = spans[start][0], spans[end - 1][1]
            entities.append({"type": kind, "start": char_start, "end": char_end, "text": text[char_start:char_end],
                             "word_start": start, "word_end": end, "propensity": math.prod(word_propensities[start:end])})
        probabilities = [{name: float(q) for name, q in zip(served.labels, row)} for row in p]
        propensity = math.prod(word_propensities)
        results.append({"tokens": words, "tags": shown, "entities": entities, "propensity": propensity,
                        "probabilities": probabilities, "best_tags": best, "truncated_words": len(words) - len(seen)})
        records.append({"input_text": text, "input_tokens": words, "shown": shown, "best": best, "entities": entities,
                        "probabilities": probabilities, "propensity": propensity})
    return results, records


def _words_seen(served: ServedClassifier, words: list[str]) -> set[int]:
    """The indices of the words with a sub-token within ``max_tokens`` (special tokens included)."""
    encoding = served.tokenizer(words, is_split_into_words=True, truncation=True, max_length=served.max_tokens)
    return {w for w in encoding.word_ids() if w is not None}


def _cut_words(served: ServedClassifier, text: str) -> int:
    """How many of the text's words lie wholly past the first ``max_tokens`` sub-tokens."""
    tokenizer = served.tokenizer
    if not getattr(tokenizer, "is_fast", False):  # no offsets: count per word
        room = served.max_tokens - tokenizer.num_special_tokens_to_add()
        used, cut = 0, 0
        for word, _, _ in split_words(text):
            used += len(tokenizer(word, add_special_tokens=False)["input_ids"])
            cut += used > room
        return cut
    encoding = tokenizer(text, truncation=True, max_length=served.max_tokens, return_offsets_mapping=True)
    read_to = max((end for start, end in encoding["offset_mapping"] if end > start), default=0)
    return sum(1 for _, start, _ in split_words(text) if start >= read_to)
