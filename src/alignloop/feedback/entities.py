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

FEEDBACK_KINDS = ("thumbs", "rating", "pairwise", "correction")
VERDICTS = ("a", "b", "tie", "both_bad")
ENDPOINTS = ("chat", "completion")
# The fields each kind may set; a value in another kind's field is refused, not silently dropped.
KIND_FIELDS = {
    "thumbs": ("up",),
    "rating": ("rating",),
    "pairwise": ("other_completion_id", "verdict", "left"),
    "correction": ("correction",),
}
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


@dataclass(frozen=True)
class User:
    id: int
    name: str
    admin: bool


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

    kind: str  # "thumbs" | "rating" | "pairwise" | "correction"
    completion_id: str  # pairwise: completion A
    up: bool | None = None  # thumbs
    rating: int | None = None  # rating, 1..5
    other_completion_id: str | None = None  # pairwise: completion B (differs from A)
    verdict: str | None = None  # pairwise: "a" | "b" | "tie" | "both_bad"
    left: str | None = None  # pairwise: which of "a"/"b" was shown on the left
    correction: str | None = None  # correction: the user's edited answer
    comment: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class FeedbackRecord:
    """A stored vote, with the text and model version of the completion it is attached to."""

    id: int
    user_id: int
    kind: str
    completion_id: str
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
    completion_text: str
    model_version: str

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


@dataclass(frozen=True)
class Vote:
    """One live feedback row with the answers it is about (:meth:`FeedbackStore.votes`)."""

    feedback_id: int
    user: str
    kind: str  # thumbs | rating | pairwise | correction
    updated_at: datetime
    a: Answer
    b: Answer | None = None  # pairwise: the other answer
    up: bool | None = None
    rating: int | None = None
    verdict: str | None = None  # a | b | tie | both_bad
    correction: str | None = None



def check_user_name(name: str) -> str:
    name = name.strip() if isinstance(name, str) else ""
    if not name or len(name) > 100:
        raise Invalid("field 'name': a user name must be 1 to 100 characters", field="name")
    return name


def check_completion(record: CompletionRecord) -> None:
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
    if fb.kind not in FEEDBACK_KINDS:
        raise Invalid(f"field 'kind' must be one of {', '.join(FEEDBACK_KINDS)}, got {fb.kind!r}", field="kind")
    for kind, names in KIND_FIELDS.items():
        for name in names:
            if kind != fb.kind and getattr(fb, name) is not None:
                raise Invalid(f"field '{name}' belongs to {kind} feedback, not {fb.kind}", field=name)
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
