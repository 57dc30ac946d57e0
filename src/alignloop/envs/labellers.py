"""Simulated labellers: people who know the true label of each text in a pool of unlabelled
traffic, send it through a served classifier's real ``POST /v1/classify`` with their own API
keys, and say whether each prediction they were shown is correct, as the page's classify view
lets a person do (``POST /v1/feedback`` kind ``prediction``).

The truth stays inside this module, as a simulated user's utility does in :mod:`.users`: the
server and the trainer only ever see the verdicts. How a labeller answers:

* **honest**: the verdict is the truth, flipped with probability ``noise`` (a slip). A "wrong"
  names the right label with probability ``name_label``; when the verdict is itself a slip (the
  prediction was right), the label named is a wrong one, drawn uniformly from the other labels.
* **liar, random**: every verdict is a coin flip; a named label is drawn from the other labels.
* **liar, inverted**: the opposite of the honest verdict; a named label is drawn from the others.

For NER a verdict is given per shown entity: it is right when the truth has an entity of that type
over exactly those words (the conlleval rule, as the entity-F1 the gate reads), and the right label
is the truth's type over those words, or ``O`` ("not an entity") when no true entity spans them
exactly. ``correct`` is true when every shown entity is judged right; with no entity shown it says
whether the text really has none (a missed entity cannot be named in the API, only judged).
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Optional, Union

from alignloop.config import LabellerConfig
from alignloop.envs.preferences import _vader
from alignloop.envs.users import _ok
from alignloop.errors import ConfigError, DataError
from alignloop.feedback.entities import NOT_AN_ENTITY
from alignloop.models.classifier import entity_spans

# VADER's own thresholds (Hutto & Gilbert 2014, and the package's README): compound ≥ 0.05 is
# positive, ≤ −0.05 negative, in between neutral.
POSITIVE_AT, NEGATIVE_AT = 0.05, -0.05
SENTIMENT_LABELS = ("negative", "neutral", "positive")


def vader_sentiment(text: str) -> str:
    """The demo's hidden truth: 3-class sentiment from VADER's compound score.

    >>> [vader_sentiment(t) for t in ("I love it!", "It is a chair.", "I hate it.")]
    ['positive', 'neutral', 'negative']
    """
    compound = _vader().polarity_scores(text)["compound"]
    return "positive" if compound >= POSITIVE_AT else "negative" if compound <= NEGATIVE_AT else "neutral"


@dataclass(frozen=True)
class PoolItem:
    """One piece of traffic and its hidden truth."""

    input: Union[str, tuple[str, ...]]  # a text (classification) or its words (NER)
    truth: Union[str, tuple[str, ...]]  # the true label, or one BIO tag per word

    @property
    def tagged(self) -> bool:
        return isinstance(self.input, tuple)


def chitchat_sentiment_pool(size: Optional[int] = None, min_words: int = 3, max_chars: int = 200,
                            seed: int = 0) -> list[PoolItem]:
    """Real chitchat utterances (the ``chitchat-dataset`` package) with their VADER sentiment as the
    truth: each distinct utterance of ``min_words``–``max_chars`` once, in a seeded shuffle (so
    the first N of one seed are the same on every machine and slices of it are disjoint: a demo
    takes its seed set, traffic and held-out set as consecutive slices), the first ``size``.

    One line of chat is what a monitor would classify; longer turns are rare and left out so a
    small model's max length does not cut them."""
    from alignloop.data.builtin import chitchat_conversations

    seen: dict[str, None] = {}
    for conversation in chitchat_conversations():
        for _, text in conversation:
            text = text.strip()
            if len(text.split()) >= min_words and len(text) <= max_chars:
                seen.setdefault(text)
    texts = list(seen)
    random.Random(seed).shuffle(texts)
    return [PoolItem(text, vader_sentiment(text)) for text in texts[:size]]


def pool_from_records(path: str, size: Optional[int] = None) -> list[PoolItem]:
    """A pool from labelled (``text``, ``label``) or tagged (``tokens``, ``tags``) records: what
    the data says is the hidden truth. Errors name the file and line."""
    from alignloop.data.load import load_records

    rows, kind = load_records(path, ("labelled", "tagged"), max_samples=size)
    if kind == "labelled":
        return [PoolItem(str(r.fields["text"]), str(r.fields["label"])) for r in rows]
    pool = []
    for r in rows:
        tokens, tags = tuple(map(str, r.fields["tokens"])), tuple(map(str, r.fields["tags"]))
        if len(tokens) != len(tags):
            raise DataError(f"{r.where}: {len(tokens)} tokens but {len(tags)} tags; each word needs one tag")
        pool.append(PoolItem(tokens, tags))
    return pool


def pool_records(pool: Sequence[PoolItem]) -> list[dict]:
    """The pool with its truth as training or held-out records: labelled (``text``, ``label``) or
    tagged (``tokens``, ``tags``), the kinds ``alignloop classify`` and ``evaluate --task`` read
    (e.g. a demo's seed set and held-out set, as slices of one pool)."""
    return [{"tokens": list(item.input), "tags": list(item.truth)} if item.tagged else {"text": item.input, "label": item.truth}
            for item in pool]


def load_pool(cfg: LabellerConfig) -> list[PoolItem]:
    """The pool ``cfg.pool`` names (see :class:`~alignloop.config.LabellerConfig`)."""
    if cfg.pool == "chitchat-sentiment":
        return chitchat_sentiment_pool(cfg.pool_size)
    return pool_from_records(cfg.pool, cfg.pool_size)


@lru_cache(maxsize=4096)
def true_entities(tags: tuple[str, ...]) -> dict[tuple[int, int], str]:
    """{(word_start, word_end): type} of the true entities, ``word_end`` exclusive (the API's
    convention), read by the conlleval rule, as the entity-F1 is."""
    return {(start, end): kind for kind, start, end in entity_spans(tags)}


@dataclass
class Labeller:
    """One labeller: a name and key for the API, and how they answer."""

    name: str
    key: str
    noise: float = 0.05
    name_label: float = 0.0
    liar: Optional[Literal["random", "inverted"]] = None

    def verdict(self, right: bool, rng: random.Random) -> bool:
        """Whether this labeller says "correct" of an output that is ``right`` or not."""
        if self.liar == "random":
            return rng.random() < 0.5
        said = right != (rng.random() < self.noise)
        return not said if self.liar == "inverted" else said

    def named(self, said: bool, right: bool, shown: str, truth: str, labels: Sequence[str],
              rng: random.Random) -> Optional[str]:
        """The label a "wrong" names (or None): the truth from an honest labeller who is right to
        say wrong, else a label other than the shown one."""
        if said or rng.random() >= self.name_label:
            return None
        if self.liar is None and not right:
            return truth
        others = [label for label in labels if label != shown]
        return rng.choice(others) if others else None

    def judge_label(self, shown: str, truth: str, labels: Sequence[str], rng: random.Random) -> dict[str, Any]:
        """The feedback fields for a classification: ``correct`` and maybe ``label``."""
        right = shown == truth
        said = self.verdict(right, rng)
        body: dict[str, Any] = {"correct": said}
        label = self.named(said, right, shown, truth, labels, rng)
        if label is not None:
            body["label"] = label
        return body

    def judge_entities(self, entities: Sequence[dict], tags: tuple[str, ...], types: Sequence[str],
                       rng: random.Random) -> dict[str, Any]:
        """The feedback fields for an NER prediction: a verdict per shown entity (``entities`` as the
        API returns them) and ``correct`` = all of them right; with none shown, whether the text
        really has no entity."""
        truth = true_entities(tags)
        if not entities:
            return {"correct": self.verdict(not truth, rng)}
        verdicts = []
        for index, entity in enumerate(entities):
            true_type = truth.get((entity["word_start"], entity["word_end"]), NOT_AN_ENTITY)
            right = true_type == entity["type"]
            said = self.verdict(right, rng)
            verdict: dict[str, Any] = {"index": index, "correct": said}
            label = self.named(said, right, entity["type"], true_type, [*types, NOT_AN_ENTITY], rng)
            if label is not None:
                verdict["label"] = label
            verdicts.append(verdict)
        return {"correct": all(v["correct"] for v in verdicts), "entities": verdicts}


def make_labellers(cfg: LabellerConfig, add_user: Callable[[str], str], prefix: str = "labeller") -> list[Labeller]:
    """``cfg.users`` labellers; ``add_user(name) -> key`` registers each with the server's store;
    ``cfg.liar_share`` of them (rounded) lie, chosen by ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    liars = set(rng.sample(range(cfg.users), round(cfg.liar_share * cfg.users)))
    labellers = []
    for i in range(cfg.users):
        name = f"{prefix}-{i:03d}-{uuid.uuid4().hex[:6]}"
        labellers.append(Labeller(name, add_user(name), cfg.noise, cfg.name_label, cfg.liar_kind if i in liars else None))
    return labellers


@dataclass
class Verdict:
    """One judged output, as the labeller saw it, with the truth the server never sees: a
    classification, or one shown entity (``entity`` its index) of an NER prediction."""

    user: str
    prediction_id: str
    shown: str  # the label, or the entity's type
    truth: str  # the true label, or the true type over the entity's words ("O": none)
    correct: bool  # what the labeller said
    label: Optional[str] = None  # the label the labeller named, if any
    entity: Optional[int] = None

    @property
    def right(self) -> bool:
        return self.shown == self.truth


@dataclass
class LabellingStats:
    """What a round of labelling did."""

    predictions: int = 0
    feedback: int = 0
    verdicts: list[Verdict] = field(default_factory=list)
    by_user: Counter = field(default_factory=Counter)  # feedback posted per labeller name

    def as_dict(self) -> dict[str, Any]:
        n = len(self.verdicts)
        return {"predictions": self.predictions, "feedback": self.feedback, "verdicts": n,
                "shown_accuracy": sum(v.right for v in self.verdicts) / n if n else None,
                "said_correct": sum(v.correct for v in self.verdicts) / n if n else None,
                "labels_named": sum(v.label is not None for v in self.verdicts)}


def run_labelling(client: Any, labellers: Sequence[Labeller], pool: Sequence[PoolItem], model: str,
                  batch_size: int = 16, seed: int = 0, concurrent: bool = True) -> LabellingStats:
    """The pool is dealt out among the labellers (item ``i`` to labeller ``i mod n``); each sends
    theirs through ``client`` (an ``httpx.Client`` with the server's base URL, or FastAPI's
    TestClient) in ``POST /v1/classify`` requests of ``batch_size`` inputs, and posts one
    ``prediction`` feedback per result, a batch's in one ``POST /v1/feedback/batch``. Raises on any non-2xx answer: a simulation must not hide
    a broken server.

    With ``concurrent`` each labeller is a thread of their own; each draws from their own seeded
    random stream, so what they say does not depend on the scheduling (what the server shows
    still may, through its exploration)."""
    if not labellers:
        raise ConfigError("run_labelling needs one or more labellers")
    task, labels = _check_pool(client, labellers[0], pool, model)
    stats = LabellingStats()
    lock = threading.Lock()

    def one_labeller(index: int, labeller: Labeller) -> None:
        rng = random.Random(f"{seed}/{index}")
        headers = {"Authorization": f"Bearer {labeller.key}"}
        mine = list(pool[index :: len(labellers)])
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            body = {"model": model, "input": [list(item.input) if item.tagged else item.input for item in batch]}
            answer = _ok(client.post("/v1/classify", json=body, headers=headers)).json()
            if len(answer["results"]) != len(batch):
                raise RuntimeError(f"simulated labeller: {len(batch)} inputs but {len(answer['results'])} results")
            verdicts, items = [], []
            for item, result in zip(batch, answer["results"]):
                if task == "ner":
                    judged = labeller.judge_entities(result["entities"], item.truth, labels, rng)
                else:
                    judged = labeller.judge_label(result["label"], item.truth, labels, rng)
                items.append({"kind": "prediction", "prediction_id": result["prediction_id"], **judged,
                              "idempotency_key": uuid.uuid4().hex})
                verdicts += _verdicts(labeller.name, item, result, judged)
            # One request for the batch's verdicts, as an annotation tool syncs: a labeller's pace
            # is then one classify and one feedback request per batch, well inside the per-user
            # rate limit, however fast the model answers. Each item is answered on its own.
            answered = _ok(client.post("/v1/feedback/batch", json={"items": items}, headers=headers)).json()["data"]
            refused = [a for a in answered if a["status"] >= 300]
            if refused:
                raise RuntimeError(f"simulated labeller: {len(refused)} of {len(items)} verdicts refused: {refused[0]}")
            posted = len(items)
            with lock:
                stats.predictions += len(batch)
                stats.feedback += posted
                stats.verdicts += verdicts
                stats.by_user[labeller.name] += posted

    if concurrent and len(labellers) > 1:
        with ThreadPoolExecutor(max_workers=len(labellers), thread_name_prefix="simulated-labeller") as threads:
            for done in [threads.submit(one_labeller, i, labeller) for i, labeller in enumerate(labellers)]:
                done.result()  # the first labeller's error, if any, is raised here
    else:
        for i, labeller in enumerate(labellers):
            one_labeller(i, labeller)
    return stats


def _check_pool(client: Any, labeller: Labeller, pool: Sequence[PoolItem], model: str) -> tuple[str, list[str]]:
    """The served model's task and the labels a labeller may name (NER: its entity types), read
    from ``GET /v1/models``; refuses a pool that does not fit the model before any prediction is
    made (a prediction is logged traffic, and a wrong simulation should leave none)."""
    cards = _ok(client.get("/v1/models", headers={"Authorization": f"Bearer {labeller.key}"})).json()["data"]
    card = next((c for c in cards if c["id"] == model), None)
    served = [c["id"] for c in cards if c.get("task") in ("classification", "ner")]
    if card is None or card.get("task") not in ("classification", "ner"):
        raise ConfigError(f"model {model!r} is not a classifier this server serves; it serves {served or 'no classifier'}")
    if card["task"] == "ner":
        if not all(item.tagged for item in pool):
            raise ConfigError(f"model {model!r} tags entities: it needs a pool of tagged records (tokens, tags), not texts")
        # B-PER, I-PER → PER; a bare tag other than O (IO tagging) is its own type, as the server reads it.
        types = sorted({tag[2:] if tag[:2] in ("B-", "I-") else tag for tag in card["labels"] if tag != NOT_AN_ENTITY})
        unknown = {kind for item in pool for kind in true_entities(item.truth).values()} - set(types)
        if unknown:
            raise ConfigError(f"the pool has entity types {sorted(unknown)} that model {model!r} does not know (it knows {types})")
        return "ner", types
    if any(item.tagged for item in pool):
        raise ConfigError(f"model {model!r} classifies texts: it needs a pool of labelled texts, not tagged words")
    labels = list(card["labels"])
    unknown = {item.truth for item in pool} - set(labels)
    if unknown:
        raise ConfigError(f"the pool has labels {sorted(unknown)} that are not model {model!r}'s labels ({', '.join(labels)})")
    return "classification", labels


def _verdicts(user: str, item: PoolItem, result: dict, judged: dict) -> list[Verdict]:
    if "entities" in result:
        truth = true_entities(item.truth)
        by_index = {v["index"]: v for v in judged.get("entities", [])}
        return [Verdict(user, result["prediction_id"], e["type"], truth.get((e["word_start"], e["word_end"]), NOT_AN_ENTITY),
                        by_index[i]["correct"], by_index[i].get("label"), entity=i)
                for i, e in enumerate(result["entities"])]
    return [Verdict(user, result["prediction_id"], result["label"], item.truth, judged["correct"], judged.get("label"))]
