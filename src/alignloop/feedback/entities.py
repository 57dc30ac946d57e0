"""What the feedback store takes and gives: users, completions, votes, and the errors it raises,
with the checks a vote or completion must pass before any database is touched.

Errors carry ``field``, the request field at fault, so the server can answer with a 4xx that names
it (``{"error": {"param": FIELD}}``) and the CLI prints one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from alignloop.errors import AlignloopError
from alignloop.feedback.schema import utc_now

FEEDBACK_KINDS = ("thumbs", "rating", "pairwise", "correction", "prediction")
VERDICTS = ("a", "b", "tie", "both_bad")
ENDPOINTS = ("chat", "completion")
TASKS = ("classification", "ner")  # what a served classifier does: one label per text, or one BIO tag per word
# The fields each kind may set; a value in another kind's field is refused, not silently dropped.
KIND_FIELDS = {
    "thumbs": ("up",),
    "rating": ("rating",),
    "pairwise": ("other_completion_id", "verdict", "left"),
    "correction": ("correction",),
    "prediction": ("prediction_id", "correct", "label", "entities"),
}
NOT_AN_ENTITY = "O"  # an entity verdict's label for "these words are no entity at all"
MAX_COMMENT_CHARS = 10_000
MAX_CORRECTION_CHARS = 100_000
MAX_TAGS, MAX_TAG_CHARS = 32, 64
MAX_ID_CHARS = 100  # completion and conversation ids; the schema's column width
MAX_IDEMPOTENCY_KEY_CHARS = 200


class StoreError(AlignloopError):
    """The feedback store cannot do what was asked; the message says what to do. ``field`` names
    the request field at fault, where there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(StoreError):
    """The thing a request field names does not exist, or belongs to another user (the two are
    not told apart, so ids of other users' completions leak nothing)."""


class Invalid(StoreError):
    """A request field has a value the store refuses (out of range, wrong kind, empty)."""


class IdempotencyConflict(StoreError):
    """An Idempotency-Key was reused with a different body."""


class NotAuthorized(StoreError):
    """The API key a write came with is no longer the user's (revoked or rotated)."""


class Unavailable(StoreError):
    """The database cannot be reached right now (a dropped connection, a restart): nothing was
    written; the same request may succeed in a moment (HTTP 503 with Retry-After)."""


def refuse_nul(value: Any, field: str) -> None:
    """Refuse text holding a NUL character (U+0000), anywhere inside ``value`` (a string, or the
    lists and dicts of a JSON field). PostgreSQL's text and jsonb cannot hold it and SQLite can:
    refusing it on both keeps the two back-ends storing the same rows."""
    if isinstance(value, str):
        if "\x00" in value:
            raise Invalid(f"field '{field}' contains a NUL character (\\u0000), which the store does not hold", field=field)
    elif isinstance(value, dict):
        for key, item in value.items():
            refuse_nul(key, field)
            refuse_nul(item, field)
    elif isinstance(value, (list, tuple)):
        for item in value:
            refuse_nul(item, field)


@dataclass(frozen=True)
class User:
    id: int
    name: str
    admin: bool
    has_key: bool = True  # False once revoked (and for --no-auth's "anonymous", who never had one)


@dataclass
class CompletionRecord:
    """One generated choice and its provenance, as the server stores it."""

    id: str  # "chatcmpl-<32 hex>-<choice>" or "cmpl-<32 hex>-<choice>"
    request_id: str  # the OpenAI response id; the n choices of a request share it
    choice_index: int
    user_id: int
    model_name: str  # the name it was served under
    model_version: str  # content hash of weights + adapter; registered with register_model first
    endpoint: str  # "chat" | "completion"
    prompt_messages: list[dict] | None  # chat: the request's messages
    prompt_text: str | None  # completion endpoint: the prompt string
    rendered_prompt: str  # after the chat template: what the model actually saw
    prompt_tokens: int
    completion_text: str
    completion_token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    sampling: dict  # temperature, top_p, max_tokens, stop, seed, n
    latency_ms: float
    ttft_ms: float | None
    conversation_id: str | None = None
    created_at: datetime = field(default_factory=utc_now)


@dataclass
class FeedbackInput:
    """A vote as a user sends it. Which fields apply depends on ``kind`` (see KIND_FIELDS)."""

    kind: str  # "thumbs" | "rating" | "pairwise" | "correction" | "prediction"
    completion_id: str | None = None  # pairwise: completion A; None only for a prediction
    up: bool | None = None  # thumbs
    rating: int | None = None  # rating, 1..5
    other_completion_id: str | None = None  # pairwise: completion B (differs from A)
    verdict: str | None = None  # pairwise: "a" | "b" | "tie" | "both_bad"
    left: str | None = None  # pairwise: which of "a"/"b" was shown on the left
    correction: str | None = None  # correction: the user's edited answer
    comment: str | None = None
    tags: list[str] = field(default_factory=list)
    prediction_id: str | None = None  # prediction: the result's prediction_id
    correct: bool | None = None  # prediction: was what was shown right (NER: every shown entity)
    label: str | None = None  # prediction, classification: the right label (only with correct=false)
    entities: list[dict] | None = None  # prediction, NER: [{"index", "correct", "label"?}] per shown entity judged


@dataclass
class FeedbackRecord:
    """A stored vote, with the text and model version of the completion (or the model version of
    the prediction) it is attached to."""

    id: int
    user_id: int
    kind: str
    completion_id: str | None
    up: bool | None
    rating: int | None
    other_completion_id: str | None
    verdict: str | None
    left: str | None
    correction: str | None
    comment: str | None
    tags: list[str]
    created_at: datetime
    updated_at: datetime
    revision: int  # 1 when created, +1 per replacement
    completion_text: str | None  # None for a prediction
    model_version: str
    # Defaults: an idempotent replay stored before predictions existed has none of these.
    prediction_id: str | None = None
    correct: bool | None = None
    label: str | None = None
    entities: list[dict] | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["updated_at"] = self.updated_at.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeedbackRecord:
        times = {name: datetime.fromisoformat(data[name]) for name in ("created_at", "updated_at")}
        return cls(**{**data, **times})


@dataclass(frozen=True)
class Answer:
    """One completion as a vote on it is judged: the prompt a person saw and the answer."""

    completion_id: str
    prompt: Any  # the chat messages, or the prompt string
    rendered_prompt: str  # what the model saw: two answers are siblings when this is equal
    text: str
    model_version: str

    @property
    def chat(self) -> bool:
        return isinstance(self.prompt, list)

    def as_answer(self, text: str | None = None) -> Any:
        """The record field for this answer's text: an assistant message for chat prompts."""
        text = self.text if text is None else text
        return [{"role": "assistant", "content": text}] if self.chat else text


@dataclass
class PredictionRecord:
    """One input a served classifier answered, what it showed and with what probability, as the
    server stores it (see :class:`alignloop.feedback.schema.Prediction` for each field's shape)."""

    id: str  # "pred-<32 hex>-<input index>"
    request_id: str  # "clsreq-<32 hex>": the inputs of one request share it
    user_id: int
    model_name: str
    model_version: str  # registered with register_model first
    task: str  # "classification" | "ner"
    input_text: str  # NER given words: the words joined by single spaces
    input_tokens: list[str] | None  # NER: the words
    shown: Any  # classification: a label; NER: a BIO tag per word
    best: Any  # the argmax answer, same shape as shown
    entities: list[dict] | None  # NER: the shown spans, each with its propensity
    probabilities: Any  # classification: {label: p}; NER: [{tag: p}, ...] per word
    propensity: float  # P(shown | input) under the exploration policy (NER: product over words)
    exploration: dict  # the policy that chose: {"method": "epsilon", "epsilon": 0.1}, ...
    created_at: datetime = field(default_factory=utc_now)

    @property
    def labels(self) -> list[str]:
        """The model's labels (classification) or tags (NER): the probabilities' keys."""
        if self.task == "ner":
            return list(self.probabilities[0]) if self.probabilities else []
        return list(self.probabilities)


@dataclass(frozen=True)
class Shown:
    """A prediction as a vote on it is judged: what the model saw and showed, with what probability."""

    prediction_id: str
    model_version: str
    task: str
    text: str
    tokens: list[str] | None
    shown: Any
    entities: list[dict] | None
    propensity: float


@dataclass(frozen=True)
class Vote:
    """One live feedback row with the answers it is about (:meth:`FeedbackStore.votes`): ``a``
    (and ``b``) for a completion, ``prediction`` for a prediction."""

    feedback_id: int
    user: str
    kind: str  # thumbs | rating | pairwise | correction | prediction
    updated_at: datetime
    a: Answer | None  # None for a prediction
    b: Answer | None = None  # pairwise: the other answer
    up: bool | None = None
    rating: int | None = None
    verdict: str | None = None  # a | b | tie | both_bad
    correction: str | None = None
    prediction: Shown | None = None
    correct: bool | None = None
    label: str | None = None
    entities: list[dict] | None = None

    @property
    def model_versions(self) -> set[str]:
        """The versions whose output this vote judges."""
        if self.prediction is not None:
            return {self.prediction.model_version}
        return {a.model_version for a in (self.a, self.b) if a is not None}



def check_user_name(name: str) -> str:
    name = name.strip() if isinstance(name, str) else ""
    refuse_nul(name, "name")
    if not name or len(name) > 100:
        raise Invalid("field 'name': a user name must be 1 to 100 characters", field="name")
    return name


def check_completion(record: CompletionRecord) -> None:
    for name in ("id", "prompt_messages", "prompt_text", "rendered_prompt", "completion_text", "conversation_id", "sampling"):
        refuse_nul(getattr(record, name), name)
    if not record.id or len(record.id) > MAX_ID_CHARS:
        raise Invalid(f"field 'id' must be 1 to {MAX_ID_CHARS} characters", field="id")
    if record.endpoint not in ENDPOINTS:
        raise Invalid(f"field 'endpoint' must be one of {', '.join(ENDPOINTS)}, got {record.endpoint!r}",
                      field="endpoint")
    if record.endpoint == "chat" and not isinstance(record.prompt_messages, list):
        raise Invalid("field 'prompt_messages' is required for the chat endpoint", field="prompt_messages")
    if record.endpoint == "completion" and not isinstance(record.prompt_text, str):
        raise Invalid("field 'prompt_text' is required for the completion endpoint", field="prompt_text")
    if record.conversation_id is not None and not 0 < len(record.conversation_id) <= MAX_ID_CHARS:
        raise Invalid(f"field 'conversation_id' must be 1 to {MAX_ID_CHARS} characters", field="conversation_id")
    if record.created_at.tzinfo is None:
        raise Invalid("field 'created_at' must be timezone-aware (UTC)", field="created_at")


def check_feedback(fb: FeedbackInput) -> None:
    """Refuse a bad kind/value combination, naming the field; touches no database."""
    for name in ("completion_id", "other_completion_id", "correction", "comment", "tags", "prediction_id", "label", "entities"):
        refuse_nul(getattr(fb, name), name)
    if fb.kind not in FEEDBACK_KINDS:
        raise Invalid(f"field 'kind' must be one of {', '.join(FEEDBACK_KINDS)}, got {fb.kind!r}", field="kind")
    for kind, names in KIND_FIELDS.items():
        for name in names:
            if kind != fb.kind and getattr(fb, name) is not None:
                raise Invalid(f"field '{name}' belongs to {kind} feedback, not {fb.kind}", field=name)
    if fb.kind == "prediction":
        if fb.completion_id is not None:
            raise Invalid("field 'completion_id' is not for prediction feedback; give 'prediction_id'", field="completion_id")
        check_prediction_verdict(fb)
    elif not isinstance(fb.completion_id, str) or not fb.completion_id:
        raise Invalid(f"field 'completion_id' is required for {fb.kind} feedback", field="completion_id")
    if fb.kind == "thumbs" and not isinstance(fb.up, bool):
        raise Invalid("field 'up' must be true or false for thumbs feedback", field="up")
    integer = isinstance(fb.rating, int) and not isinstance(fb.rating, bool)  # True is an int in Python
    if fb.kind == "rating" and not (integer and 1 <= fb.rating <= 5):
        raise Invalid(f"field 'rating' must be an integer from 1 to 5, got {fb.rating!r}", field="rating")
    if fb.kind == "pairwise":
        if not isinstance(fb.other_completion_id, str) or not fb.other_completion_id:
            raise Invalid("field 'other_completion_id' is required for pairwise feedback (completion B)",
                          field="other_completion_id")
        if fb.other_completion_id == fb.completion_id:
            raise Invalid("field 'other_completion_id' names the same completion as 'completion_id'; "
                          "a comparison needs two different completions", field="other_completion_id")
        if fb.verdict not in VERDICTS:
            raise Invalid(f"field 'verdict' must be one of {', '.join(VERDICTS)}, got {fb.verdict!r}", field="verdict")
        if fb.left not in (None, "a", "b"):
            raise Invalid(f"field 'left' must be 'a' or 'b' (the completion shown on the left), got {fb.left!r}",
                          field="left")
    if fb.kind == "correction":
        if not isinstance(fb.correction, str) or not fb.correction.strip():
            raise Invalid("field 'correction' must be the edited answer, not empty", field="correction")
        if len(fb.correction) > MAX_CORRECTION_CHARS:
            raise Invalid(f"field 'correction' is longer than {MAX_CORRECTION_CHARS} characters", field="correction")
    if fb.comment is not None and (not isinstance(fb.comment, str) or len(fb.comment) > MAX_COMMENT_CHARS):
        raise Invalid(f"field 'comment' must be text of at most {MAX_COMMENT_CHARS} characters", field="comment")
    if (not isinstance(fb.tags, list) or len(fb.tags) > MAX_TAGS
            or not all(isinstance(t, str) and 0 < len(t) <= MAX_TAG_CHARS for t in fb.tags)):
        raise Invalid(f"field 'tags' must be a list of at most {MAX_TAGS} strings of 1 to {MAX_TAG_CHARS} characters",
                      field="tags")


def check_prediction_verdict(fb: FeedbackInput) -> None:
    """The checks of prediction feedback that need no prediction; those against the model's
    labels and the shown entities are :func:`check_against_prediction`'s."""
    if not isinstance(fb.prediction_id, str) or not 0 < len(fb.prediction_id) <= MAX_ID_CHARS:
        raise Invalid(f"field 'prediction_id' is required for prediction feedback (1 to {MAX_ID_CHARS} characters)",
                      field="prediction_id")
    if not isinstance(fb.correct, bool):
        raise Invalid("field 'correct' must be true or false: was what the model showed right", field="correct")
    if fb.label is not None:
        if not isinstance(fb.label, str) or not fb.label:
            raise Invalid("field 'label' must be one of the model's labels", field="label")
        if fb.correct:
            raise Invalid("field 'label' is the right label when the shown one was wrong; leave it out with correct=true",
                          field="label")
    if fb.entities is None:
        return
    if not isinstance(fb.entities, list) or not all(isinstance(e, dict) for e in fb.entities):
        raise Invalid('field \'entities\' must be a list of {"index", "correct", "label"?}', field="entities")
    seen = set()
    for e in fb.entities:
        index, correct, label = e.get("index"), e.get("correct"), e.get("label")
        if set(e) - {"index", "correct", "label"}:
            raise Invalid(f"field 'entities': unknown keys {sorted(set(e) - {'index', 'correct', 'label'})}", field="entities")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise Invalid(f"field 'entities': index must be a shown entity's position (0, 1, ...), got {index!r}",
                          field="entities")
        if index in seen:
            raise Invalid(f"field 'entities': entity {index} is judged twice", field="entities")
        seen.add(index)
        if not isinstance(correct, bool):
            raise Invalid(f"field 'entities': entity {index} needs correct true or false", field="entities")
        if label is not None and (correct or not isinstance(label, str) or not label):
            raise Invalid(f"field 'entities': entity {index}: label is the right type (or \"O\") of a wrong entity only",
                          field="entities")
        if fb.correct and not correct:
            raise Invalid(f"field 'entities': entity {index} is judged wrong but correct=true says every shown entity is right",
                          field="entities")


def check_against_prediction(fb: FeedbackInput, prediction: PredictionFacts) -> None:
    """Prediction feedback against the prediction it judges: a label the model has, entity
    verdicts on entities that were shown."""
    if prediction.task == "ner":
        if fb.label is not None:
            raise Invalid("field 'label' is for a classification; judge an NER prediction's entities with 'entities'",
                          field="label")
        types = prediction.entity_types
        for e in fb.entities or []:
            if e["index"] >= len(prediction.shown_entities):
                raise Invalid(f"field 'entities': entity {e['index']} was not shown; the prediction showed "
                              f"{len(prediction.shown_entities)} (indices from 0)", field="entities")
            label = e.get("label")
            if label is not None and label not in types and label != NOT_AN_ENTITY:
                raise Invalid(f"field 'entities': entity {e['index']}: label {label!r} is not one of the model's types "
                              f"{sorted(types)} or {NOT_AN_ENTITY!r}", field="entities")
            if label is not None and label == prediction.shown_entities[e["index"]]:
                raise Invalid(f"field 'entities': entity {e['index']} is judged wrong with the type it was shown as",
                              field="entities")
        return
    if fb.entities is not None:
        raise Invalid("field 'entities' is for an NER prediction; a classification takes 'label'", field="entities")
    if fb.label is not None:
        if fb.label not in prediction.labels:
            raise Invalid(f"field 'label': {fb.label!r} is not one of the model's labels {list(prediction.labels)}",
                          field="label")
        if fb.label == prediction.shown:
            raise Invalid(f"field 'label': {fb.label!r} is the label that was shown; with correct=false give the right one",
                          field="label")


@dataclass(frozen=True)
class PredictionFacts:
    """What the feedback path needs to know about a prediction; never changes once written."""

    user_id: int
    model_version: str
    task: str
    labels: tuple[str, ...]  # classification: the labels; NER: the tags
    shown: Any
    shown_entities: tuple[str, ...]  # NER: the type of each shown entity, in order

    @property
    def entity_types(self) -> set[str]:
        # B-X/I-X name type X; a bare tag other than O is a type itself (IO tagging, as entity_spans reads it)
        return {tag[2:] if tag[:2] in ("B-", "I-") else tag for tag in self.labels if tag != NOT_AN_ENTITY}

    @classmethod
    def of(cls, record: PredictionRecord) -> PredictionFacts:
        return cls(record.user_id, record.model_version, record.task, tuple(record.labels), record.shown,
                   tuple(e["type"] for e in record.entities or []))


def check_prediction(record: PredictionRecord) -> None:
    for name in ("id", "input_text", "input_tokens"):
        refuse_nul(getattr(record, name), name)
    if not record.id or len(record.id) > MAX_ID_CHARS:
        raise Invalid(f"field 'id' must be 1 to {MAX_ID_CHARS} characters", field="id")
    if record.task not in TASKS:
        raise Invalid(f"field 'task' must be one of {', '.join(TASKS)}, got {record.task!r}", field="task")
    p = record.propensity
    if not isinstance(p, float) or not 0.0 < p <= 1.0:
        raise Invalid(f"field 'propensity' must be a probability in (0, 1], got {p!r}", field="propensity")
    if record.task == "ner":
        words = record.input_tokens
        if not isinstance(words, list) or not (len(words) == len(record.shown) == len(record.best) == len(record.probabilities)):
            raise Invalid("field 'input_tokens': an NER prediction has one shown tag, best tag and probabilities per word",
                          field="input_tokens")
        if not isinstance(record.entities, list):
            raise Invalid("field 'entities' is required for an NER prediction (empty when none was shown)", field="entities")
    elif not isinstance(record.probabilities, dict) or record.shown not in record.probabilities:
        raise Invalid("field 'shown' must be one of the labels in 'probabilities'", field="shown")
    if record.created_at.tzinfo is None:
        raise Invalid("field 'created_at' must be timezone-aware (UTC)", field="created_at")
