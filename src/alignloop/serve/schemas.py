"""Request and response bodies of the HTTP API (pydantic): the OpenAI-compatible shapes the
official ``openai`` client sends and reads, plus alignloop's extensions (``completion_id`` on every
choice, ``model_version`` on every response, ``conversation_id`` on chat requests) and feedback.

Unknown request fields are ignored, as OpenAI-compatible servers do (clients send fields such as
``logprobs`` or ``user`` that a server may not implement); known fields are checked strictly and
an error names the field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from alignloop.feedback.entities import (
    MAX_COMMENT_CHARS,
    MAX_CORRECTION_CHARS,
    MAX_ID_CHARS,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
)


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL character (\\u0000), which the store does not hold")
    return value


# Every string a request carries: PostgreSQL cannot store NUL and SQLite can, so it is refused
# here (422 naming the field, before any generation) and both back-ends store the same rows.
Str = Annotated[str, AfterValidator(_no_nul)]
Text = Annotated[Str, Field(max_length=200_000)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[Text, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """The sampling fields both completion endpoints take."""

    model_config = ConfigDict(extra="ignore")
    model: Str = Field(min_length=1, max_length=200)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)  # the newer OpenAI name
    stop: Union[None, Annotated[Str, Field(max_length=200)], Annotated[list[Annotated[Str, Field(max_length=200)]], Field(max_length=4)]] = None
    seed: Optional[StrictInt] = Field(None, ge=0, le=2**63 - 1)

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    conversation_id: Optional[Annotated[Str, Field(min_length=1, max_length=MAX_ID_CHARS)]] = None


class CompletionRequest(SamplingFields):
    # Text, or token ids (as vLLM takes them): a trainer that applied the chat template itself
    # sends the exact tokens it will score, so the server does not tokenise them a second time.
    prompt: Union[Text, Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=200_000)]] = Field(min_length=1)
    # OpenAI's legacy field: the log-prob of each sampled token (under the distribution it was
    # drawn from) in choices[].logprobs; 0..5 alternatives are accepted, none are listed.
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=5)
    # vLLM's extension: choices[].logprobs.tokens as "token_id:ID", so a client gets the exact ids.
    return_tokens_as_token_ids: StrictBool = False


FeedbackKind = Literal["thumbs", "rating", "pairwise", "correction", "prediction"]


class EntityVerdict(BaseModel):
    """A verdict on one shown entity of an NER prediction: ``index`` into the result's
    ``entities``; ``label`` the right type, or "O" for no entity (only when wrong)."""

    model_config = ConfigDict(extra="forbid")
    index: StrictInt = Field(ge=0)
    correct: StrictBool
    label: Optional[Str] = Field(None, min_length=1, max_length=200)


class FeedbackIn(BaseModel):
    """One piece of feedback on a completion (``completion_id``: the choice's ``completion_id``)
    or, kind ``prediction``, on a classifier's prediction (``prediction_id``: the result's)."""

    model_config = ConfigDict(extra="forbid")
    kind: FeedbackKind
    completion_id: Optional[Str] = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    up: Optional[StrictBool] = None
    rating: Optional[StrictInt] = Field(None, ge=1, le=5)
    other_completion_id: Optional[Str] = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    verdict: Optional[Literal["a", "b", "tie", "both_bad"]] = None
    left: Optional[Literal["a", "b"]] = None
    correction: Optional[Str] = Field(None, max_length=MAX_CORRECTION_CHARS)
    comment: Optional[Str] = Field(None, max_length=MAX_COMMENT_CHARS)
    tags: list[Annotated[Str, Field(min_length=1, max_length=MAX_TAG_CHARS)]] = Field(default_factory=list, max_length=MAX_TAGS)
    prediction_id: Optional[Str] = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    correct: Optional[StrictBool] = None
    label: Optional[Str] = Field(None, min_length=1, max_length=200)
    entities: Optional[list[EntityVerdict]] = Field(None, max_length=1000)

    def to_input(self) -> dict:
        """The fields as the store takes them: an entity verdict without a label has no ``label`` key."""
        data = self.model_dump(exclude={"idempotency_key"})
        if self.entities is not None:
            data["entities"] = [e.model_dump(exclude_none=True) for e in self.entities]
        return data

    @field_validator("correction")
    @classmethod
    def _correction_not_blank(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("a correction needs the corrected answer's text")
        return value


class FeedbackOut(BaseModel):
    id: int
    kind: FeedbackKind
    completion_id: Optional[str] = None
    up: Optional[bool] = None
    rating: Optional[int] = None
    other_completion_id: Optional[str] = None
    verdict: Optional[str] = None
    left: Optional[str] = None
    correction: Optional[str] = None
    comment: Optional[str] = None
    tags: list[str] = []
    revision: int
    created_at: datetime
    updated_at: datetime
    completion_text: Optional[str] = None
    model_version: Optional[str] = None
    prediction_id: Optional[str] = None
    correct: Optional[bool] = None
    label: Optional[str] = None
    entities: Optional[list[dict]] = None
    outcome: Optional[Literal["created", "replaced", "replayed"]] = None
    # On reads (GET) of feedback on completions, what a history shows beside the verdict: the
    # prompt's last user message, and for a comparison the other answer's text.
    prompt_text: Optional[str] = None
    other_completion_text: Optional[str] = None


class FeedbackList(BaseModel):
    data: list[FeedbackOut]


MAX_FEEDBACK_BATCH = 1000


class FeedbackBatchItem(FeedbackIn):
    """One item of a batch: a piece of feedback and, optionally, its own idempotency key."""

    idempotency_key: Optional[Str] = Field(None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS)


class RefusedItem:
    """A batch item that failed validation: its own 422, while the other items go ahead."""

    def __init__(self, param: str, message: str) -> None:
        self.param, self.message = param, message


class FeedbackBatchIn(BaseModel):
    """Many pieces of feedback of one user in one request (an annotation tool syncing, an
    importer): each item is checked and answered on its own (an invalid item gets its own 422
    and is not written; the valid ones are), and they commit together."""

    model_config = ConfigDict(extra="forbid")
    items: list[FeedbackBatchItem] = Field(min_length=1, max_length=MAX_FEEDBACK_BATCH)

    @field_validator("items", mode="wrap")
    @classmethod
    def _each_item_on_its_own(cls, value: Any, handler: Any) -> Any:
        """Validate item by item: a bad item becomes a :class:`RefusedItem` in its place instead
        of failing the whole request (the schema still documents ``FeedbackBatchItem``)."""
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_FEEDBACK_BATCH:
            return handler(value)  # not a list, or too few or many items: the whole body is refused, as usual
        items: list[Any] = []
        for i, item in enumerate(value):
            try:
                items.append(FeedbackBatchItem.model_validate(item))
            except ValidationError as e:
                first = e.errors()[0]
                field = ".".join(str(part) for part in first["loc"])
                items.append(RefusedItem(f"items[{i}]{'.' + field if field else ''}",
                                         "; ".join(f"{'.'.join(map(str, err['loc'])) or 'item'}: {err['msg']}" for err in e.errors()[:5])))
        return items


class FeedbackBatchError(BaseModel):
    message: str
    type: str
    param: Optional[str] = None


class FeedbackBatchResult(BaseModel):
    """The item's own status: 201 created, 200 replaced or replayed, 4xx refused (``error``)."""

    status: int
    feedback: Optional[FeedbackOut] = None
    error: Optional[FeedbackBatchError] = None


class FeedbackBatchOut(BaseModel):
    data: list[FeedbackBatchResult]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "alignloop"
    version: str
    task: str = "chat"  # or a classifier's: "classification" | "ner"
    labels: Optional[list[str]] = None  # a classifier's labels (NER: its BIO tags), in id order


class ClassifyRequest(BaseModel):
    """POST /v1/classify: ``input`` is a text, a list of texts, or (NER models only) a list of word
    lists; checked by the route so every refusal names ``input``."""

    model_config = ConfigDict(extra="forbid")
    model: Str = Field(min_length=1, max_length=200)
    input: Any


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Me(BaseModel):
    id: int
    name: str
    admin: bool
    auth: bool


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class DeployIn(BaseModel):
    """Serve another model folder under a served name (``/admin/deploy``), or on a gateway, send
    the name's requests to another upstream model id."""

    model_config = ConfigDict(extra="forbid")
    name: Str = Field(min_length=1, max_length=200)
    path: Str = Field(min_length=1, max_length=4096)  # on a gateway (serve --upstream): the upstream's model id
    # A gateway only: the version the upstream model's rows record (default: the registry's for this
    # path, else upstream:<model id>); a local model's version is its weights' hash.
    version: Optional[Str] = Field(None, min_length=1, max_length=64)


class DeployOut(BaseModel):
    name: str
    version: str
    previous_version: Optional[str] = None


class ConversationSummary(BaseModel):
    """One of the caller's conversations in a list (``GET /v1/conversations``)."""

    id: str
    title: str  # the first user message, cut short
    created_at: datetime
    updated_at: datetime
    model: Optional[str] = None  # the model of the latest answer


class ConversationList(BaseModel):
    data: list[ConversationSummary]


class TurnVotes(BaseModel):
    """The caller's live votes on an assistant turn's completion."""

    thumbs: Optional[bool] = None
    rating: Optional[int] = None
    correction: Optional[str] = None


class ConversationTurn(BaseModel):
    """A message of the conversation; an assistant turn carries the ``completion_id`` feedback
    attaches to (None when no stored completion produced it, e.g. an answer stopped mid-stream)."""

    role: str
    content: str
    completion_id: Optional[str] = None
    model: Optional[str] = None
    finish_reason: Optional[str] = None
    original: Optional[str] = None  # the model's text, when ``content`` is the caller's correction of it
    votes: Optional[TurnVotes] = None


class ConversationOut(ConversationSummary):
    turns: list[ConversationTurn]


# --- the admin page's routes (/admin/users, /admin/models) ---------------------------------------

class AdminUser(BaseModel):
    id: int
    name: str
    admin: bool
    active: bool  # has a key that works; False once revoked


class AdminUserList(BaseModel):
    data: list[AdminUser]


class NewUserIn(BaseModel):
    """Add a user (``POST /admin/users``); the answer carries their API key, once."""

    model_config = ConfigDict(extra="forbid")
    name: Str = Field(min_length=1, max_length=100)
    admin: StrictBool = False


class UserKeyOut(BaseModel):
    """A user and their new API key: shown this once, as only its hash is stored."""

    user: AdminUser
    key: str


class RegistryVersion(BaseModel):
    """One model version of the registry, as ``alignloop models`` lists it."""

    version: str
    name: str
    path: str
    parent_version: Optional[str] = None
    created_at: datetime
    feedback_rows: int
    evaluation: Optional[dict[str, Any]] = None
    deployed: bool  # the registry's deployed version of its name
    promoted_at: Optional[datetime] = None
    serving: bool  # what this server answers its name with right now


class RegistryList(BaseModel):
    data: list[RegistryVersion]


class LineageRow(BaseModel):
    feedback_id: int
    user_name: str
    kind: str


class LineageOut(BaseModel):
    """Where a version came from: its ancestry (itself first, then parent, ...) and the
    feedback rows that trained it."""

    version: str
    ancestry: list[str]
    feedback: list[LineageRow]


class VersionDeployOut(DeployOut):
    """``POST /admin/models/{version}/deploy``: ``version`` is what the server now serves; a
    ``warning`` says why it differs from ``requested_version`` (the folder changed since)."""

    requested_version: str
    warning: Optional[str] = None
