"""The feedback store's tables, as SQLAlchemy 2.x ORM classes.

The migrations in ``migrations/versions/`` create exactly these tables (a test compares them);
change both together: a new migration for every change here.

What links to what::

    users ─< completions >─ models            (who asked, which weights answered)
    users ─< conversations ─< messages        (the chat as the user sent it)
    users ─< predictions >─ models            (a served classifier's answer, with its propensity)
    completions ─< feedback >─ users          (one live vote per user, target and kind)
    predictions ─< feedback                   (kind "prediction": right or wrong, the right label)
    users ─< idempotency_keys                 (retried POSTs answered from the first result)
    rate_buckets                              (shared rate limits: a token bucket per user or address)

Timestamps are UTC and come back timezone-aware from both SQLite (which stores them naive) and
PostgreSQL (``timestamptz``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.TypeDecorator):
    """A timestamp stored in UTC and read back tz-aware: SQLite keeps no offset, so a naive
    value read from it is UTC by construction."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the feedback store only takes timezone-aware times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# Named constraints, so later migrations can alter them on SQLite (batch mode recreates tables).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON, list[Any]: sa.JSON}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100), unique=True)
    # sha256 hex of the API key; NULL for users that cannot log in (--no-auth's "anonymous")
    key_hash: Mapped[str | None] = mapped_column(sa.String(64), unique=True)
    admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime]


class Model(Base):
    """A model version (the registry): the content hash of its weights and adapter, the name it
    was first served under and the folder it was loaded from; for a version the closed loop
    trained, also its parent, run folder, datasets, evaluation against the parent, and whether it
    is the deployed one."""

    __tablename__ = "models"

    version: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    path: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime]
    parent_version: Mapped[str | None] = mapped_column(sa.ForeignKey("models.version"))
    run_dir: Mapped[str | None] = mapped_column(sa.Text)
    datasets: Mapped[dict[str, Any] | None]
    evaluation: Mapped[dict[str, Any] | None]
    deployed: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    promoted_at: Mapped[datetime | None]


class ModelFeedback(Base):
    """Lineage: each feedback row that trained a model version, with who gave it and its kind
    copied here, so the answer survives the user deleting the vote later (hence no foreign key
    to ``feedback``)."""

    __tablename__ = "model_feedback"

    model_version: Mapped[str] = mapped_column(sa.ForeignKey("models.version"), primary_key=True)
    feedback_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_name: Mapped[str] = mapped_column(sa.String(100), index=True)  # "which models did this user's feedback reach"
    kind: Mapped[str] = mapped_column(sa.String(16))


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(sa.String(100), primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Message(Base):
    """One turn of a conversation as the user's client sent it, in order."""

    __tablename__ = "messages"
    __table_args__ = (sa.UniqueConstraint("conversation_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[str] = mapped_column(sa.ForeignKey("conversations.id"))
    position: Mapped[int]
    role: Mapped[str] = mapped_column(sa.String(16))
    content: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime]


class Completion(Base):
    """One generated choice with everything needed to reproduce or train on it."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(sa.String(100), primary_key=True)
    request_id: Mapped[str] = mapped_column(sa.String(100), index=True)  # the n choices of a request share it
    choice_index: Mapped[int]
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    model_name: Mapped[str] = mapped_column(sa.String(200))
    model_version: Mapped[str] = mapped_column(sa.ForeignKey("models.version"), index=True)
    endpoint: Mapped[str] = mapped_column(sa.String(16))  # "chat" | "completion"
    prompt_messages: Mapped[list[Any] | None]
    prompt_text: Mapped[str | None] = mapped_column(sa.Text)
    rendered_prompt: Mapped[str] = mapped_column(sa.Text)
    prompt_tokens: Mapped[int]
    completion_text: Mapped[str] = mapped_column(sa.Text)
    completion_token_ids: Mapped[list[Any]]
    finish_reason: Mapped[str] = mapped_column(sa.String(16))
    sampling: Mapped[dict[str, Any]]
    latency_ms: Mapped[float]
    ttft_ms: Mapped[float | None]
    conversation_id: Mapped[str | None] = mapped_column(sa.ForeignKey("conversations.id"), index=True)
    created_at: Mapped[datetime]


class Prediction(Base):
    """One input a served classifier answered: what it saw, what it showed, what it thought best,
    and the probability with which its exploration policy showed it (``propensity``), which is
    what makes the feedback on it usable for off-policy (bandit) training.

    Classification: ``shown`` and ``best`` are labels, ``probabilities`` maps label → p. NER:
    ``input_tokens`` are the words, ``shown``/``best`` one BIO tag per word, ``probabilities`` one
    {tag: p} per word, ``entities`` the shown spans (type, word and character offsets, text and
    each one's propensity: the product of its words'), ``propensity`` the product over all words.
    """

    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(sa.String(100), primary_key=True)  # "pred-<32 hex>-<input index>"
    request_id: Mapped[str] = mapped_column(sa.String(100), index=True)  # the inputs of a request share it
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    model_name: Mapped[str] = mapped_column(sa.String(200))
    model_version: Mapped[str] = mapped_column(sa.ForeignKey("models.version"), index=True)
    task: Mapped[str] = mapped_column(sa.String(16))  # "classification" | "ner"
    input_text: Mapped[str] = mapped_column(sa.Text)
    input_tokens: Mapped[list[Any] | None]
    shown: Mapped[Any] = mapped_column(sa.JSON)
    best: Mapped[Any] = mapped_column(sa.JSON)
    entities: Mapped[list[Any] | None]
    probabilities: Mapped[Any] = mapped_column(sa.JSON)
    # Double: an importance weight is 1/propensity, so it must come back exactly as it was served.
    propensity: Mapped[float] = mapped_column(sa.Double)
    exploration: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class Feedback(Base):
    """A user's live vote on a completion (or, for pairwise, on a pair of completions), or on a
    classifier's prediction (kind ``prediction``: ``completion_id`` is NULL, ``prediction_id`` set).

    ``target`` is what makes a vote "the same vote": the completion id, or for pairwise the two
    ids sorted and joined by a space, so A-vs-B and B-vs-A replace each other; the prediction id
    for a prediction. A replacement overwrites the row and bumps ``revision``.
    """

    __tablename__ = "feedback"
    __table_args__ = (
        sa.UniqueConstraint("user_id", "kind", "target"),
        sa.Index("ix_feedback_user_id_updated_at", "user_id", "updated_at"),  # a user's history, newest first
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(sa.String(16), index=True)  # export filters by kind
    target: Mapped[str] = mapped_column(sa.String(201))
    completion_id: Mapped[str | None] = mapped_column(sa.ForeignKey("completions.id"), index=True)
    other_completion_id: Mapped[str | None] = mapped_column(sa.ForeignKey("completions.id"), index=True)
    up: Mapped[bool | None]
    rating: Mapped[int | None]
    verdict: Mapped[str | None] = mapped_column(sa.String(16))
    left: Mapped[str | None] = mapped_column(sa.String(1))
    correction: Mapped[str | None] = mapped_column(sa.Text)
    prediction_id: Mapped[str | None] = mapped_column(sa.ForeignKey("predictions.id"), index=True)
    correct: Mapped[bool | None]  # prediction: was what was shown right
    label: Mapped[str | None] = mapped_column(sa.String(200))  # prediction (classification): the right label
    entities: Mapped[list[Any] | None]  # prediction (NER): [{"index", "correct", "label"?}] per judged shown entity
    comment: Mapped[str | None] = mapped_column(sa.Text)
    tags: Mapped[list[Any]]
    revision: Mapped[int]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class IdempotencyKey(Base):
    """The first answer to a POST carrying ``Idempotency-Key``: a retry with the same key and
    body gets it back without writing; the same key with another body is refused."""

    __tablename__ = "idempotency_keys"

    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(sa.String(64))  # sha256 of the canonical JSON body
    response: Mapped[dict[str, Any]]  # the FeedbackRecord first returned, as JSON
    created_at: Mapped[datetime]


class RateBucket(Base):
    """A token bucket shared by the server replicas on this database (``serve --limits
    database``): ``key`` names the limit and whom it counts (``requests:42``, ``tokens:42``,
    ``logins:10.0.0.7``). Times are the database server's clock in seconds since the epoch, so
    replicas whose clocks differ still agree. Unlogged on PostgreSQL (migration 0004)."""

    __tablename__ = "rate_buckets"

    key: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    tokens: Mapped[float] = mapped_column(sa.Double)  # left after the last take, as of updated_at
    updated_at: Mapped[float] = mapped_column(sa.Double)
    granted: Mapped[bool]  # whether the last take found enough tokens (what the take returns)
