"""The durable feedback store: users, served model versions, completions with their provenance,
and the feedback people give on them. SQLite by default, PostgreSQL by URL.

Every write goes through one group-commit writer (:mod:`alignloop.feedback.writer`) and returns
only after its transaction has committed, so an acknowledged write survives a crash. On SQLite
the database runs in WAL mode with ``synchronous=NORMAL`` by default: a commit has been written to
the WAL file (the OS holds it) before COMMIT returns, which survives a SIGKILL of the process; only
a power cut or an OS crash can lose the last commits. ``durability="full"`` (``serve
--db-durability full``) fsyncs each commit, which survives those too.
On PostgreSQL a commit is flushed to its WAL before it returns (``synchronous_commit=on``).

Reads run on the calling thread through a small connection pool. Completions never change once
written, so their owner, text and model version are cached to keep the feedback path short.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import secrets
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import sqlalchemy as sa

from alignloop.feedback import schema
from alignloop.feedback.database import (
    DEFAULT_DB_URL,
    current_revision,
    database_error,
    first_line,
    head_revision,
    make_engine,
    resolve_db_url,
    shown_url,
    upgrade,
)
from alignloop.feedback.datasets import RECORD_KINDS, DatasetRules, build_datasets
from alignloop.feedback.entities import (
    FEEDBACK_KINDS,
    MAX_ID_CHARS,
    MAX_IDEMPOTENCY_KEY_CHARS,
    Answer,
    CompletionRecord,
    FeedbackInput,
    FeedbackRecord,
    IdempotencyConflict,
    Invalid,
    NotAuthorized,
    NotFound,
    PredictionFacts,
    PredictionRecord,
    Shown,
    StoreError,
    Unavailable,
    User,
    Vote,
    check_against_prediction,
    check_completion,
    check_feedback,
    check_prediction,
    check_user_name,
)
from alignloop.feedback.schema import utc_now
from alignloop.feedback.writer import GroupCommitWriter, WriterStopped

# The store's API in one import: ``from alignloop.feedback.store import FeedbackStore, upgrade, ...``
__all__ = [
    "DEFAULT_DB_URL", "CompletionRecord", "FeedbackInput", "FeedbackRecord", "FeedbackStore", "IdempotencyConflict",
    "Invalid", "NotAuthorized", "NotFound", "PredictionRecord", "StoreError", "Unavailable", "User", "make_engine", "model_path", "resolve_db_url", "upgrade",
]

COMPLETION_CACHE_SIZE = 100_000

users_t = schema.User.__table__
models_t = schema.Model.__table__
conversations_t = schema.Conversation.__table__
messages_t = schema.Message.__table__
completions_t = schema.Completion.__table__
predictions_t = schema.Prediction.__table__
feedback_t = schema.Feedback.__table__
idempotency_t = schema.IdempotencyKey.__table__
model_feedback_t = schema.ModelFeedback.__table__


_KEY_STILL_VALID = sa.select(users_t.c.id).where(users_t.c.id == sa.bindparam("user_id"), users_t.c.key_hash == sa.bindparam("key_hash"))


# The token bucket in one upsert (PostgreSQL): refill by the time since the last take (the
# database's clock, which every replica shares), then take ``cost`` if it is there. Every SET
# expression reads the row as it was, so ``granted`` and ``tokens`` agree.
_REFILLED = "least(%(burst)s, b.tokens + greatest(0, excluded.updated_at - b.updated_at) * %(rate)s)"
_TAKE_SQL = f"""INSERT INTO rate_buckets AS b (key, tokens, updated_at, granted)
VALUES (%(key)s, %(burst)s - %(cost)s, extract(epoch FROM clock_timestamp()), true)
ON CONFLICT (key) DO UPDATE SET
  granted = {_REFILLED} >= %(cost)s,
  tokens = {_REFILLED} - CASE WHEN {_REFILLED} >= %(cost)s THEN %(cost)s ELSE 0 END,
  updated_at = excluded.updated_at
RETURNING tokens, granted"""
_PEEK_SQL = ("SELECT least(%(burst)s, tokens + greatest(0, extract(epoch FROM clock_timestamp()) - updated_at) * %(rate)s) "
             "FROM rate_buckets WHERE key = %(key)s")


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _request_hash(fb: FeedbackInput) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(fb), sort_keys=True).encode()).hexdigest()


# The columns a vote sets (a replacement sets them all again).
FEEDBACK_VALUES = ("completion_id", "up", "rating", "other_completion_id", "verdict", "left", "correction", "comment", "tags",
                   "prediction_id", "correct", "label", "entities")


@functools.cache
def _feedback_upsert(dialect: str) -> Any:
    """Insert a vote, or replace the live one and bump its revision; returns id, revision and
    created_at. Built once per dialect: building the statement per call cost more than running it."""
    insert = _dialect_insert(dialect)(feedback_t)
    names = ("user_id", "target", "kind", *FEEDBACK_VALUES)
    insert = insert.values({**{name: sa.bindparam(name, type_=feedback_t.c[name].type) for name in names},
                            "revision": 1, "created_at": sa.bindparam("now", type_=feedback_t.c.created_at.type),
                            "updated_at": sa.bindparam("now", type_=feedback_t.c.updated_at.type)})
    replaced = {name: insert.excluded[name] for name in names if name not in ("user_id", "target", "kind")}
    return insert.on_conflict_do_update(
        index_elements=["user_id", "kind", "target"],
        set_={**replaced, "revision": feedback_t.c.revision + 1, "updated_at": insert.excluded.updated_at},
    ).returning(feedback_t.c.id, feedback_t.c.revision, feedback_t.c.created_at)


def _dialect_insert(dialect: str) -> Any:
    """``insert`` with ``ON CONFLICT`` for ``dialect`` (SQLite and PostgreSQL spell it alike in
    SQLAlchemy)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


@dataclass(frozen=True)
class _CompletionFacts:
    """What the feedback path needs to know about a completion; never changes once written."""

    user_id: int
    completion_text: str
    model_version: str


class FeedbackStore:
    """The store behind ``alignloop serve``, the CLI and export. Safe to share between threads."""

    def __init__(self, url: str, durability: str = "normal") -> None:
        self.url = url
        self._engine = make_engine(url, durability=durability)
        try:
            revision = current_revision(self._engine)
        except sa.exc.OperationalError as e:
            self._engine.dispose()
            raise StoreError(f"{shown_url(url)}: cannot connect to the feedback database ({first_line(e.orig)})") from None
        head = head_revision()
        if revision != head:
            self._engine.dispose()
            state = ("has no alignloop schema" if revision is None
                     else f"has schema revision {revision}, this alignloop needs {head}")
            raise StoreError(f"{shown_url(url)}: the feedback database {state}; "
                             f"run `alignloop db upgrade --db {shown_url(url)}`")
        self._completions: OrderedDict[str, _CompletionFacts] = OrderedDict()
        self._predictions: OrderedDict[str, PredictionFacts] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._lookups = threading.local()  # per thread: a driver connection kept for key lookups
        self._lookup_connections: list[Any] = []
        self._key_sql = "SELECT id, name, admin FROM users WHERE key_hash = " + ("?" if self._engine.dialect.paramstyle == "qmark" else "%s")
        self._writer = GroupCommitWriter(self._engine.execution_options(sqlite_immediate=True),
                                         expected_errors=StoreError)

    def close(self) -> None:
        """Finish queued writes and release the connections."""
        self._writer.close()
        with self._cache_lock:
            lookups, self._lookup_connections = self._lookup_connections, []
        for conn in lookups:
            conn.close()
        self._engine.dispose()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, write: Callable[[sa.Connection], Any]) -> Any:
        try:
            return self._writer.submit(write)
        except WriterStopped as e:  # the caller's write did not happen
            raise self._stopped(e) from None
        except sa.exc.DBAPIError as e:  # rolled back: a lost connection (the writer reconnects) or a refused value
            raise database_error(e) from None

    def _stopped(self, e: WriterStopped) -> StoreError:
        return StoreError(f"{shown_url(self.url)}: {e}")

    # users ---------------------------------------------------------------------------------

    def add_user(self, name: str, admin: bool = False) -> str:
        """Create a user; return their API key. Only its sha256 is stored, so this is the one
        time anyone sees it."""
        name = check_user_name(name)
        key = "al-" + secrets.token_urlsafe(32)

        def write(conn: sa.Connection) -> None:
            if conn.execute(sa.select(users_t.c.id).where(users_t.c.name == name)).first() is not None:
                raise Invalid(f"field 'name': a user named {name!r} already exists; pick another name", field="name")
            conn.execute(users_t.insert().values(name=name, key_hash=_hash_key(key), admin=admin, created_at=utc_now()))

        self._write(write)
        return key

    def ensure_user(self, name: str, admin: bool = False) -> User:
        """The user called ``name``, created without a usable key if absent (``--no-auth``'s
        "anonymous")."""
        name = check_user_name(name)

        def write(conn: sa.Connection) -> User:
            row = conn.execute(sa.select(users_t).where(users_t.c.name == name)).first()
            if row is None:
                conn.execute(users_t.insert().values(name=name, key_hash=None, admin=admin, created_at=utc_now()))
                row = conn.execute(sa.select(users_t).where(users_t.c.name == name)).one()
            return User(row.id, row.name, row.admin)

        return self._write(write)

    def revoke_user(self, name: str) -> None:
        """Take the user's API key away: the next request with it is refused (the server looks
        every key up afresh). Their rows stay; ``rotate_key`` gives them a new key."""
        self._set_key(name, None)

    def rotate_key(self, name: str) -> str:
        """Replace the user's API key with a new one and return it: the old key stops working at once."""
        key = "al-" + secrets.token_urlsafe(32)
        self._set_key(name, _hash_key(key))
        return key

    def _set_key(self, name: str, key_hash: str | None) -> None:
        name = check_user_name(name)

        def write(conn: sa.Connection) -> None:
            if conn.execute(users_t.update().where(users_t.c.name == name).values(key_hash=key_hash)).rowcount != 1:
                raise NotFound(f"no user named {name!r}; `alignloop users list` shows them", field="name")

        self._write(write)

    def user_by_key(self, key: str) -> User | None:
        """The user whose API key this is, read afresh (a server calls it on every request but
        feedback writes, so a revoked key fails at once). One indexed read on a driver connection
        this thread keeps for it (:meth:`_on_own_connection`): through SQLAlchemy's pool and
        statement machinery the same read cost 270 µs against 7 (SQLite)."""
        row = self._on_own_connection(self._key_sql, (_hash_key(key),))
        return None if row is None else User(row[0], row[1], bool(row[2]))

    def _on_own_connection(self, sql: str, params: Any) -> tuple | None:
        """Run one statement on the driver connection this thread keeps for the per-request
        reads and counts (in autocommit) and return its first row, if any. A connection the
        database dropped is replaced and the statement made again once (each one here is a read
        or a bucket take, which a lost connection did not commit); a second failure is
        :class:`Unavailable`."""
        for attempt in (1, 2):
            conn = getattr(self._lookups, "conn", None)
            try:
                if conn is None:
                    conn = self._lookups.conn = self._lookup_connection()
                cursor = conn.cursor()
                cursor.execute(sql, params)
                row = cursor.fetchone() if cursor.description is not None else None
                cursor.close()
                return None if row is None else tuple(row)
            except (sa.exc.DBAPIError, self._engine.dialect.loaded_dbapi.Error) as e:
                self._lookups.conn = None
                if conn is not None:
                    with self._cache_lock:
                        if conn in self._lookup_connections:
                            self._lookup_connections.remove(conn)
                    conn.invalidate()
                if attempt == 2:
                    reason = first_line(e.orig if isinstance(e, sa.exc.DBAPIError) else e)
                    raise Unavailable(f"the feedback database is unavailable ({reason}); retry shortly") from None
        raise AssertionError("unreachable")

    def _lookup_connection(self) -> Any:
        conn = self._engine.raw_connection()
        if self._engine.dialect.name == "postgresql":
            conn.driver_connection.autocommit = True  # each read or bucket take commits alone: no transaction left open
        with self._cache_lock:
            self._lookup_connections.append(conn)
        return conn

    # shared rate limits (serve --limits database) -------------------------------------------

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    def take_from_bucket(self, key: str, cost: float, per_second: float, burst: float) -> tuple[bool, float]:
        """Take ``cost`` tokens from the shared token bucket ``key`` if it holds them: (True,
        tokens left), else (False, tokens there now) and nothing is taken. A bucket refills at
        ``per_second`` up to ``burst``; a key never seen is a full bucket. One statement (an
        upsert that refills, compares and takes under the row's lock), so replicas taking from
        the same bucket at once never both spend the same tokens. Not through the group-commit
        writer: a take answers in about a tenth of a millisecond, and a bucket is not data to keep
        (the table is unlogged). PostgreSQL only."""
        tokens, granted = self._on_own_connection(_TAKE_SQL, {"key": key, "cost": float(cost), "rate": float(per_second),
                                                              "burst": float(burst)}) or (0.0, False)  # RETURNING always gives the row
        return bool(granted), float(tokens)

    def bucket_tokens(self, key: str, per_second: float, burst: float) -> float:
        """The tokens in the shared bucket ``key`` now (``burst`` for a key never seen); takes nothing."""
        row = self._on_own_connection(_PEEK_SQL, {"key": key, "rate": float(per_second), "burst": float(burst)})
        return float(burst) if row is None else float(row[0])

    def sweep_buckets(self, prefix: str, idle_seconds: float) -> int:
        """Drop the buckets under ``prefix`` untouched for ``idle_seconds`` (the time one takes to
        refill from empty: they are full, as a missing row is). Returns how many."""
        with self._engine.begin() as conn:
            return conn.execute(sa.text("DELETE FROM rate_buckets WHERE starts_with(key, :prefix) AND "
                                        "updated_at < extract(epoch FROM clock_timestamp()) - :idle"),
                                {"prefix": prefix, "idle": idle_seconds}).rowcount

    def list_users(self) -> list[User]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(users_t).order_by(users_t.c.id)).all()
        return [User(row.id, row.name, row.admin, row.key_hash is not None) for row in rows]

    # models and completions ------------------------------------------------------------------

    def register_model(self, name: str, version: str, path: str) -> None:
        """Record a served model version; registering a known version again changes nothing.
        A local ``path`` is stored absolute (:func:`model_path`)."""
        path = model_path(path)
        if not version or len(version) > 64:
            raise Invalid(f"field 'version' must be 1 to 64 characters, got {version!r}", field="version")

        def write(conn: sa.Connection) -> None:
            stmt = _dialect_insert(conn.dialect.name)(models_t).values(version=version, name=name, path=path, created_at=utc_now())
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["version"]))

        self._write(write)

    # --- the model registry (the closed loop's lineage) ----------------------------------------
    def register_trained(self, name: str, version: str, path: str, parent_version: str, run_dir: str,
                         datasets: dict, feedback: list[tuple[int, str, str]]) -> None:
        """Record a version the loop trained from ``parent_version``: its run folder, the datasets
        it was trained on (paths and counts) and the feedback rows behind them as
        ``(feedback_id, user_name, kind)``. Idempotent: rerunning an interrupted iteration adds
        no second row. A local ``path`` is stored absolute (:func:`model_path`)."""
        path = model_path(path)

        def write(conn: sa.Connection) -> None:
            if conn.execute(sa.select(models_t.c.version).where(models_t.c.version == parent_version)).first() is None:
                raise NotFound(f"field 'parent_version': model version {parent_version!r} is not registered",
                               field="parent_version")
            insert = _dialect_insert(conn.dialect.name)
            conn.execute(insert(models_t).values(version=version, name=name, path=path, created_at=utc_now())
                         .on_conflict_do_nothing(index_elements=["version"]))
            conn.execute(models_t.update().where(models_t.c.version == version)
                         .values(parent_version=parent_version, run_dir=run_dir, datasets=datasets))
            if feedback:
                conn.execute(insert(model_feedback_t).values([
                    {"model_version": version, "feedback_id": fid, "user_name": user, "kind": kind} for fid, user, kind in feedback
                ]).on_conflict_do_nothing(index_elements=["model_version", "feedback_id"]))

        self._write(write)

    def record_evaluation(self, version: str, evaluation: dict) -> None:
        """Store the version's evaluation against its parent (the gate's inputs and decision)."""

        def write(conn: sa.Connection) -> None:
            self._require_version(conn, version)
            conn.execute(models_t.update().where(models_t.c.version == version).values(evaluation=evaluation))

        self._write(write)

    def deploy(self, version: str) -> None:
        """Make ``version`` the deployed one (promotion or rollback): every other version served
        under the same name is marked not deployed in the same transaction (a server with a chat
        model and a classifier has one deployed version of each)."""

        def write(conn: sa.Connection) -> None:
            self._require_version(conn, version)
            name = conn.execute(sa.select(models_t.c.name).where(models_t.c.version == version)).scalar_one()
            conn.execute(models_t.update().where(models_t.c.version != version, models_t.c.name == name).values(deployed=False))
            conn.execute(models_t.update().where(models_t.c.version == version).values(deployed=True, promoted_at=utc_now()))

        self._write(write)

    def deployed_versions(self) -> dict[str, tuple[str, str]]:
        """Name → (version, path) of the version deployed under each name: what the server
        replicas sharing this database follow (``serve --registry-poll-seconds``)."""
        query = sa.select(models_t.c.name, models_t.c.version, models_t.c.path).where(models_t.c.deployed)
        with self._engine.connect() as conn:
            return {row.name: (row.version, row.path) for row in conn.execute(query)}

    def models(self) -> list[dict]:
        """Every registered version, oldest first, with its registry fields and how many feedback
        rows trained it."""
        counts = (sa.select(model_feedback_t.c.model_version, sa.func.count().label("feedback_rows"))
                  .group_by(model_feedback_t.c.model_version).subquery())
        query = (sa.select(models_t, sa.func.coalesce(counts.c.feedback_rows, 0).label("feedback_rows"))
                 .outerjoin(counts, counts.c.model_version == models_t.c.version)
                 .order_by(models_t.c.created_at, models_t.c.version))
        with self._engine.connect() as conn:
            return [row._asdict() for row in conn.execute(query)]

    def lineage(self, version: str) -> list[dict]:
        """The feedback rows that trained ``version``: (feedback_id, user_name, kind), by id."""
        query = (sa.select(model_feedback_t.c.feedback_id, model_feedback_t.c.user_name, model_feedback_t.c.kind)
                 .where(model_feedback_t.c.model_version == version).order_by(model_feedback_t.c.feedback_id))
        with self._engine.connect() as conn:
            self._require_version(conn, version)
            return [row._asdict() for row in conn.execute(query)]

    def reached_by(self, user_name: str) -> list[str]:
        """The model versions this user's feedback trained, oldest first."""
        query = (sa.select(model_feedback_t.c.model_version).where(model_feedback_t.c.user_name == user_name)
                 .join(models_t, models_t.c.version == model_feedback_t.c.model_version)
                 .group_by(model_feedback_t.c.model_version, models_t.c.created_at).order_by(models_t.c.created_at))
        with self._engine.connect() as conn:
            return [row[0] for row in conn.execute(query)]

    def ancestry(self, version: str) -> list[str]:
        """``version``, its parent, the parent's parent, ... up to the version the loop started
        from: the path by which the deployed weights came to be."""
        chain = [version]
        with self._engine.connect() as conn:
            self._require_version(conn, version)
            parent = sa.select(models_t.c.parent_version).where(models_t.c.version == sa.bindparam("child"))
            while (up := conn.execute(parent, {"child": chain[-1]}).scalar()) is not None and up not in chain:
                chain.append(up)
        return chain

    def user_named(self, name: str) -> User | None:
        """The user called ``name`` (revoked ones too), or None."""
        name = check_user_name(name)
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(users_t).where(users_t.c.name == name)).first()
        return None if row is None else User(row.id, row.name, row.admin, row.key_hash is not None)

    def live_votes_by_kind(self, user_id: int) -> dict[str, int]:
        """How many live votes of each kind the user has: what ``lineage --user`` shows when
        none of them trained a version."""
        query = (sa.select(feedback_t.c.kind, sa.func.count()).where(feedback_t.c.user_id == user_id)
                 .group_by(feedback_t.c.kind).order_by(feedback_t.c.kind))
        with self._engine.connect() as conn:
            return {kind: count for kind, count in conn.execute(query)}

    @staticmethod
    def _require_version(conn: sa.Connection, version: str) -> None:
        if conn.execute(sa.select(models_t.c.version).where(models_t.c.version == version)).first() is None:
            raise NotFound(f"model version {version!r} is not registered; `alignloop models` lists them", field="version")

    def add_completions(self, records: list[CompletionRecord]) -> None:
        """Store the choices of one or more requests; returns after they are committed.

        With a ``conversation_id`` the conversation is created for the record's user (or must
        already be theirs), and the chat messages it has not seen yet are appended to it in order.
        """
        for record in records:
            check_completion(record)

        def write(conn: sa.Connection) -> None:
            _require_users_and_versions(conn, records)
            conversations = {r.conversation_id: r.user_id for r in records if r.conversation_id is not None}
            for conversation_id, user_id in conversations.items():
                owner = conn.execute(sa.select(conversations_t.c.user_id)
                                     .where(conversations_t.c.id == conversation_id)).scalar()
                if owner is not None and owner != user_id:
                    raise NotFound(f"field 'conversation_id': no conversation {conversation_id!r} of yours",
                                   field="conversation_id")
            now = utc_now()
            for record in records:
                if record.conversation_id is not None:
                    _append_conversation(conn, record, now)
            conn.execute(completions_t.insert(), [dataclasses.asdict(r) for r in records])

        self._write(write)
        for record in records:
            self._remember(record.id, _CompletionFacts(record.user_id, record.completion_text, record.model_version))

    def get_completion(self, completion_id: str) -> CompletionRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(completions_t).where(completions_t.c.id == completion_id)).first()
        return None if row is None else CompletionRecord(**row._asdict())

    def _remember(self, completion_id: str, facts: _CompletionFacts) -> None:
        with self._cache_lock:
            self._completions[completion_id] = facts
            if len(self._completions) > COMPLETION_CACHE_SIZE:
                self._completions.popitem(last=False)

    def _load_completions(self, completion_ids: Sequence[Any]) -> None:
        """Read the facts of the not yet remembered completions among ``completion_ids`` in one
        query per 500, so checking a batch of votes costs a few reads, not one per vote."""
        with self._cache_lock:
            wanted = sorted({cid for cid in completion_ids if isinstance(cid, str) and len(cid) <= MAX_ID_CHARS
                             and cid not in self._completions})
        if not wanted:  # all remembered (the server wrote them): no pooled connection needed
            return
        columns = (completions_t.c.id, completions_t.c.user_id, completions_t.c.completion_text,
                   completions_t.c.model_version)
        with self._engine.connect() as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                for row in conn.execute(sa.select(*columns).where(completions_t.c.id.in_(chunk))):
                    self._remember(row.id, _CompletionFacts(row.user_id, row.completion_text, row.model_version))

    def _owned_completion(self, user_id: int, completion_id: str | None, field_name: str) -> _CompletionFacts:
        """The completion ``completion_id`` if it exists and is ``user_id``'s, else NotFound."""
        self._load_completions([completion_id])
        with self._cache_lock:
            facts = self._completions.get(completion_id) if isinstance(completion_id, str) else None
        if facts is None or facts.user_id != user_id:
            raise NotFound(f"field '{field_name}': no completion {completion_id!r} of yours", field=field_name)
        return facts

    # conversations ---------------------------------------------------------------------------
    # A client resends the whole history with each request, so the latest completion of a
    # conversation holds all of it: its prompt is every turn so far, its text the newest answer.
    # Reading turns from there (not from the appended ``messages`` rows) keeps a regenerated
    # answer or an edited and resent question as the user last saw them.

    def list_conversations(self, user_id: int, limit: int = 100) -> list[dict]:
        """The user's conversations, most recently updated first: ``id``, ``title`` (the first
        user message, cut to :data:`TITLE_CHARS`), ``created_at``, ``updated_at`` and the
        ``model`` of the latest answer."""
        if not 1 <= limit <= 1000:
            raise Invalid(f"field 'limit' must be between 1 and 1000, got {limit}", field="limit")
        query = (sa.select(conversations_t).where(conversations_t.c.user_id == user_id)
                 .order_by(conversations_t.c.updated_at.desc(), conversations_t.c.id.desc()).limit(limit))
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
            latest = _latest_completions(conn, [row.id for row in rows])
        return [{"id": row.id, "created_at": row.created_at, "updated_at": row.updated_at,
                 "title": _title(latest[row.id].prompt_messages if row.id in latest else None),
                 "model": latest[row.id].model_name if row.id in latest else None} for row in rows]

    def get_conversation(self, user_id: int, conversation_id: str) -> dict | None:
        """The conversation with its turns in order, or None if it is not ``user_id``'s. Each
        assistant turn carries the ``completion_id`` it was generated as (None for a turn no
        stored completion produced), its ``model``, ``original`` text when the turn shows the
        user's correction instead, and the user's live ``votes`` on it (thumbs, rating, correction)."""
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(conversations_t).where(conversations_t.c.id == conversation_id,
                                                                conversations_t.c.user_id == user_id)).first()
            if row is None:
                return None
            columns = (completions_t.c.id, completions_t.c.model_name, completions_t.c.prompt_messages,
                       completions_t.c.completion_text, completions_t.c.finish_reason)
            answers = conn.execute(sa.select(*columns).where(completions_t.c.conversation_id == conversation_id)
                                   .order_by(completions_t.c.created_at, completions_t.c.id)).all()
            votes = conn.execute(sa.select(feedback_t.c.completion_id, feedback_t.c.kind, feedback_t.c.up,
                                           feedback_t.c.rating, feedback_t.c.correction)
                                 .where(feedback_t.c.user_id == user_id, feedback_t.c.completion_id.in_([a.id for a in answers]),
                                        feedback_t.c.kind.in_(("thumbs", "rating", "correction")))).all() if answers else []
        turns = _turns(answers, {v.completion_id: v.correction for v in votes if v.kind == "correction"})
        for turn in turns:
            if turn["role"] == "assistant":
                turn["votes"] = _votes_of(turn.get("completion_id"), votes)
        return {"id": row.id, "created_at": row.created_at, "updated_at": row.updated_at,
                "title": _title(answers[-1].prompt_messages if answers else None),
                "model": answers[-1].model_name if answers else None, "turns": turns}

    def delete_conversation(self, user_id: int, conversation_id: str) -> bool:
        """Take the conversation off the user's list; False if there is none of theirs by that
        id. Its completions and the feedback on them stay, unlinked from it: they are training
        data, and the registry's lineage may point at them."""

        def write(conn: sa.Connection) -> bool:
            owner = conn.execute(sa.select(conversations_t.c.user_id).where(conversations_t.c.id == conversation_id)).scalar()
            if owner != user_id:
                return False
            conn.execute(completions_t.update().where(completions_t.c.conversation_id == conversation_id).values(conversation_id=None))
            conn.execute(messages_t.delete().where(messages_t.c.conversation_id == conversation_id))
            conn.execute(conversations_t.delete().where(conversations_t.c.id == conversation_id))
            return True

        return self._write(write)

    def prompts_and_texts(self, user_id: int, completion_ids: Sequence[str]) -> dict[str, tuple[str | None, str]]:
        """For the user's completions among ``completion_ids``: (the prompt's last user message,
        or the completion endpoint's prompt; the completion's text). What a feedback history shows."""
        wanted = sorted({cid for cid in completion_ids if cid})
        found: dict[str, tuple[str | None, str]] = {}
        columns = (completions_t.c.id, completions_t.c.prompt_messages, completions_t.c.prompt_text, completions_t.c.completion_text)
        with self._engine.connect() as conn:
            for start in range(0, len(wanted), 500):
                query = sa.select(*columns).where(completions_t.c.id.in_(wanted[start:start + 500]), completions_t.c.user_id == user_id)
                for row in conn.execute(query):
                    found[row.id] = (_last_user_message(row.prompt_messages) if row.prompt_messages else row.prompt_text,
                                     row.completion_text)
        return found

    # predictions -----------------------------------------------------------------------------

    def add_predictions(self, records: list[PredictionRecord]) -> None:
        """Store the predictions of one or more requests; returns after they are committed, so
        feedback on any of their ids works once the answer carrying them is sent."""
        for record in records:
            check_prediction(record)

        def write(conn: sa.Connection) -> None:
            _require_users_and_versions(conn, records)
            conn.execute(predictions_t.insert(), [dataclasses.asdict(r) for r in records])

        self._write(write)
        for record in records:
            self._remember_prediction(record.id, PredictionFacts.of(record))

    def get_prediction(self, prediction_id: str) -> PredictionRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(predictions_t).where(predictions_t.c.id == prediction_id)).first()
        return None if row is None else PredictionRecord(**row._asdict())

    def _remember_prediction(self, prediction_id: str, facts: PredictionFacts) -> None:
        with self._cache_lock:
            self._predictions[prediction_id] = facts
            if len(self._predictions) > COMPLETION_CACHE_SIZE:
                self._predictions.popitem(last=False)

    def _owned_prediction(self, user_id: int, prediction_id: Any) -> PredictionFacts:
        """The prediction ``prediction_id`` if it exists and is ``user_id``'s, else NotFound."""
        if not isinstance(prediction_id, str):
            raise NotFound(f"field 'prediction_id': no prediction {prediction_id!r} of yours", field="prediction_id")
        with self._cache_lock:
            facts = self._predictions.get(prediction_id)
        if facts is None:  # written by another process (or forgotten): read it once
            record = self.get_prediction(prediction_id)
            if record is not None:
                facts = PredictionFacts.of(record)
                self._remember_prediction(prediction_id, facts)
        if facts is None or facts.user_id != user_id:
            raise NotFound(f"field 'prediction_id': no prediction {prediction_id!r} of yours", field="prediction_id")
        return facts

    # feedback --------------------------------------------------------------------------------

    def put_feedback(self, user_id: int, fb: FeedbackInput, idempotency_key: str | None = None,
                     api_key: str | None = None) -> tuple[FeedbackRecord, str]:
        """Create or replace the user's vote; return it and ``"created"``, ``"replaced"`` or
        ``"replayed"`` (a retry with a known idempotency key: the first answer, nothing written).

        One live vote per (user, kind, target): the target is the completion, or for pairwise the
        unordered pair, so voting again replaces the vote and bumps its revision. Returns after
        COMMIT.

        ``api_key``: the key the request came with; the write's own transaction checks that it is
        still the user's (:class:`NotAuthorized` if it was revoked or rotated), so a server that
        recognised the key from memory needs no read of its own to refuse a revoked one.
        """
        return self._write(self._feedback_write(user_id, fb, idempotency_key, api_key))

    def put_feedback_many(self, user_id: int, items: Sequence[tuple[FeedbackInput, str | None]], api_key: str | None = None,
                          ) -> list[tuple[FeedbackRecord, str] | StoreError]:
        """:meth:`put_feedback` for many (feedback, idempotency key) items of one user, in order:
        all are queued before any is waited on, so they commit in few transactions. Each item
        gets its own answer, a (record, outcome) or the StoreError that refused it alone."""
        self._load_completions([cid for fb, _ in items for cid in (fb.completion_id, fb.other_completion_id)])
        queued: list[Future | BaseException] = []
        for fb, key in items:
            try:
                queued.append(self._writer.enqueue(self._feedback_write(user_id, fb, key, api_key)))
            except (StoreError, WriterStopped) as e:
                queued.append(e)
        answers: list[tuple[FeedbackRecord, str] | StoreError] = []
        for item in queued:
            error = item if isinstance(item, BaseException) else item.exception()  # waits for the commit
            if error is None:
                answers.append(item.result())
            elif isinstance(error, WriterStopped):
                answers.append(self._stopped(error))
            elif isinstance(error, StoreError):
                answers.append(error)
            elif isinstance(error, sa.exc.DBAPIError):
                answers.append(database_error(error))
            else:
                raise error
        return answers

    def _feedback_write(self, user_id: int, fb: FeedbackInput, idempotency_key: str | None,
                        api_key: str | None = None) -> Callable[[sa.Connection], Any]:
        """The checks of one piece of feedback (raising before anything is written) and its write."""
        check_feedback(fb)
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise Invalid(f"field 'idempotency_key' must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters",
                          field="idempotency_key")
        if fb.kind == "prediction":
            prediction = self._owned_prediction(user_id, fb.prediction_id)
            check_against_prediction(fb, prediction)
            target, shown_text, version = fb.prediction_id, None, prediction.model_version
        else:
            facts = self._owned_completion(user_id, fb.completion_id, "completion_id")
            target, shown_text, version = fb.completion_id, facts.completion_text, facts.model_version
        if fb.kind == "pairwise":
            self._owned_completion(user_id, fb.other_completion_id, "other_completion_id")
            target = " ".join(sorted((fb.completion_id, fb.other_completion_id)))
        request_hash = _request_hash(fb) if idempotency_key is not None else ""
        values = {name: getattr(fb, name) for name in ("kind", *FEEDBACK_VALUES)}

        key_hash = None if api_key is None else _hash_key(api_key)

        def write(conn: sa.Connection) -> tuple[FeedbackRecord, str]:
            if key_hash is not None and conn.execute(_KEY_STILL_VALID, {"user_id": user_id, "key_hash": key_hash}).first() is None:
                raise NotAuthorized("the API key is not valid (revoked or rotated)")
            if idempotency_key is not None:
                first = conn.execute(sa.select(idempotency_t.c.request_hash, idempotency_t.c.response)
                                     .where(idempotency_t.c.user_id == user_id,
                                            idempotency_t.c.key == idempotency_key)).first()
                if first is not None:
                    if first.request_hash != request_hash:
                        raise IdempotencyConflict(
                            "field 'idempotency_key': this Idempotency-Key was already used with a different "
                            "body; use a new key for a new request", field="idempotency_key")
                    return FeedbackRecord.from_json(first.response), "replayed"
            now = utc_now()
            row = conn.execute(_feedback_upsert(conn.dialect.name),
                               {**values, "user_id": user_id, "target": target, "now": now}).one()
            record = FeedbackRecord(id=row.id, user_id=user_id, created_at=row.created_at, updated_at=now,
                                    revision=row.revision, completion_text=shown_text, model_version=version, **values)
            if idempotency_key is not None:
                conn.execute(idempotency_t.insert(), {"user_id": user_id, "key": idempotency_key,
                                                      "request_hash": request_hash,
                                                      "response": record.to_json(), "created_at": now})
            return record, "created" if row.revision == 1 else "replaced"

        return write

    def _feedback_query(self, user_id: int) -> sa.Select:
        version = sa.func.coalesce(completions_t.c.model_version, predictions_t.c.model_version).label("model_version")
        return (sa.select(feedback_t, completions_t.c.completion_text, version)
                .outerjoin(completions_t, completions_t.c.id == feedback_t.c.completion_id)
                .outerjoin(predictions_t, predictions_t.c.id == feedback_t.c.prediction_id)
                .where(feedback_t.c.user_id == user_id))

    def list_feedback(self, user_id: int, kind: str | None = None, limit: int = 100) -> list[FeedbackRecord]:
        """The user's live votes, most recently created or replaced first."""
        if kind is not None and kind not in FEEDBACK_KINDS:
            raise Invalid(f"field 'kind' must be one of {', '.join(FEEDBACK_KINDS)}, got {kind!r}", field="kind")
        if not 1 <= limit <= 1000:
            raise Invalid(f"field 'limit' must be between 1 and 1000, got {limit}", field="limit")
        query = self._feedback_query(user_id)
        if kind is not None:
            query = query.where(feedback_t.c.kind == kind)
        query = query.order_by(feedback_t.c.updated_at.desc(), feedback_t.c.id.desc()).limit(limit)
        with self._engine.connect() as conn:
            return [_feedback_record(row) for row in conn.execute(query)]

    def get_feedback(self, user_id: int, feedback_id: int) -> FeedbackRecord | None:
        """The vote ``feedback_id`` if it is ``user_id``'s, else None."""
        with self._engine.connect() as conn:
            row = conn.execute(self._feedback_query(user_id).where(feedback_t.c.id == feedback_id)).first()
        return None if row is None else _feedback_record(row)

    def delete_feedback(self, user_id: int, feedback_id: int) -> bool:
        """Delete the user's own vote; False if there is none with that id (or it is another's)."""

        def write(conn: sa.Connection) -> bool:
            result = conn.execute(feedback_t.delete().where(feedback_t.c.id == feedback_id,
                                                            feedback_t.c.user_id == user_id))
            return result.rowcount == 1

        return self._write(write)

    def votes(self) -> list[Vote]:
        """Every live vote with its user, when it last changed and the answers it is about, oldest
        first: what :func:`alignloop.feedback.datasets.build_datasets` turns into training sets."""
        a, b, p = completions_t.alias("a"), completions_t.alias("b"), predictions_t.alias("p")
        query = (
            sa.select(feedback_t.c.id, feedback_t.c.kind, feedback_t.c.up, feedback_t.c.rating, feedback_t.c.verdict,
                      feedback_t.c.correction, feedback_t.c.correct, feedback_t.c.label, feedback_t.c.entities,
                      feedback_t.c.updated_at, users_t.c.name.label("user"),
                      *_answer_columns(a, "a"), *_answer_columns(b, "b"), *_shown_columns(p))
            .join(users_t, users_t.c.id == feedback_t.c.user_id)
            .outerjoin(a, a.c.id == feedback_t.c.completion_id)
            .outerjoin(b, b.c.id == feedback_t.c.other_completion_id)
            .outerjoin(p, p.c.id == feedback_t.c.prediction_id)
            .order_by(feedback_t.c.id)
        )
        with self._engine.connect() as conn:
            rows = [row._asdict() for row in conn.execute(query)]
        return [Vote(r["id"], r["user"], r["kind"], r["updated_at"], _answer(r, "a"), _answer(r, "b"), r["up"],
                     r["rating"], r["verdict"], r["correction"], _shown(r), r["correct"], r["label"], r["entities"])
                for r in rows]

    def export(self, kind: str) -> tuple[list[dict], dict[str, int]]:
        """Training records of ``kind`` (pairs, kto, sft, ratings, bandit) by the default
        :class:`~alignloop.feedback.datasets.DatasetRules` over every live vote, and the votes
        those rules skipped, per reason (the rules run once over all kinds)."""
        if kind not in RECORD_KINDS:
            raise Invalid(f"field 'kind' must be one of {', '.join(RECORD_KINDS)}, got {kind!r}", field="kind")
        sets = build_datasets(self.votes(), DatasetRules())
        return getattr(sets, kind), dict(sets.skipped)


def model_path(path: str) -> str:
    """``path`` as the registry keeps it: a local folder by its absolute, resolved path, so a
    server or ``alignloop deploy`` started from another folder finds it; anything else (a Hub
    id, a built-in size) as given."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def _require_users_and_versions(conn: sa.Connection, records: Sequence[Any]) -> None:
    """Every record's user and model version exist (completions and predictions alike)."""
    for user_id in {r.user_id for r in records}:
        if conn.execute(sa.select(users_t.c.id).where(users_t.c.id == user_id)).first() is None:
            raise NotFound(f"field 'user_id': no user {user_id}", field="user_id")
    for version in {r.model_version for r in records}:
        if conn.execute(sa.select(models_t.c.version).where(models_t.c.version == version)).first() is None:
            raise NotFound(f"field 'model_version': model version {version!r} is not registered; "
                           "call register_model first", field="model_version")


def _answer_columns(table: sa.FromClause, prefix: str) -> list[sa.ColumnElement]:
    names = ("id", "endpoint", "prompt_messages", "prompt_text", "rendered_prompt", "completion_text", "model_version")
    return [table.c[name].label(f"{prefix}_{name}") for name in names]


def _shown_columns(table: sa.FromClause) -> list[sa.ColumnElement]:
    names = ("id", "model_version", "task", "input_text", "input_tokens", "shown", "entities", "propensity")
    return [table.c[name].label(f"p_{name}") for name in names]


def _shown(row: dict[str, Any]) -> Shown | None:
    """The prediction a :meth:`FeedbackStore.votes` row judges; None for a vote on a completion."""
    if row["p_id"] is None:
        return None
    return Shown(row["p_id"], row["p_model_version"], row["p_task"], row["p_input_text"], row["p_input_tokens"],
                 row["p_shown"], row["p_entities"], row["p_propensity"])


def _answer(row: dict[str, Any], side: str) -> Answer | None:
    """Side ``a`` or ``b`` of a :meth:`FeedbackStore.votes` row; None where the vote has no such answer."""
    if row[f"{side}_id"] is None:
        return None
    chat = row[f"{side}_endpoint"] == "chat"
    return Answer(row[f"{side}_id"], row[f"{side}_prompt_messages"] if chat else row[f"{side}_prompt_text"],
                  row[f"{side}_rendered_prompt"], row[f"{side}_completion_text"], row[f"{side}_model_version"])


def _feedback_record(row: sa.Row) -> FeedbackRecord:
    data = row._asdict()
    del data["target"]
    return FeedbackRecord(**data)


def _append_conversation(conn: sa.Connection, record: CompletionRecord, now: datetime) -> None:
    """Create the conversation if new; append the request's messages beyond those stored.

    A client resends the whole history each turn, so what is new is the tail past the stored
    count: the reply it kept from the previous turn and the new user message.
    """
    updated = conn.execute(conversations_t.update().where(conversations_t.c.id == record.conversation_id)
                           .values(updated_at=now))
    if updated.rowcount == 0:
        conn.execute(conversations_t.insert().values(id=record.conversation_id, user_id=record.user_id,
                                                     created_at=now, updated_at=now))
    stored = conn.execute(sa.select(sa.func.count()).select_from(messages_t)
                          .where(messages_t.c.conversation_id == record.conversation_id)).scalar_one()
    new = (record.prompt_messages or [])[stored:]
    if new:
        conn.execute(messages_t.insert(), [
            {"conversation_id": record.conversation_id, "position": stored + i, "role": m["role"],
             "content": m["content"], "created_at": now}
            for i, m in enumerate(new)
        ])



TITLE_CHARS = 60  # a conversation's title in a list: its first user message, cut here


def _title(messages: list[dict] | None) -> str:
    first = next((m["content"] for m in messages or [] if m.get("role") == "user"), "")
    first = " ".join(first.split())
    return first if len(first) <= TITLE_CHARS else first[:TITLE_CHARS - 1].rstrip() + "…"


def _last_user_message(messages: list[dict]) -> str | None:
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), None)


def _latest_completions(conn: sa.Connection, conversation_ids: Sequence[str]) -> dict[str, sa.Row]:
    """Per conversation, its newest completion (model name and prompt messages)."""
    if not conversation_ids:
        return {}
    newest_first = sa.func.row_number().over(partition_by=completions_t.c.conversation_id,
                                             order_by=(completions_t.c.created_at.desc(), completions_t.c.id.desc()))
    ranked = (sa.select(completions_t.c.conversation_id, completions_t.c.model_name, completions_t.c.prompt_messages,
                        newest_first.label("rank"))
              .where(completions_t.c.conversation_id.in_(conversation_ids)).subquery())
    return {row.conversation_id: row for row in conn.execute(sa.select(ranked).where(ranked.c.rank == 1))}


def _turns(answers: Sequence[sa.Row], corrections: dict[str, str]) -> list[dict]:
    """The conversation as its latest answer saw it: that answer's prompt, then the answer.

    Each assistant turn is matched to the completion that produced it: among those generated
    for the same history (a regenerated answer has siblings), the latest whose text is the
    turn's, else the one the user corrected to the turn's text (``original`` keeps what the model
    wrote). A turn no stored completion produced (an answer stopped mid-stream, kept by the
    client) has no ``completion_id``."""
    if not answers:
        return []
    latest = answers[-1]
    history = [*(latest.prompt_messages or []), {"role": "assistant", "content": latest.completion_text}]
    by_prompt_length: dict[int, list[sa.Row]] = {}
    for answer in answers:
        by_prompt_length.setdefault(len(answer.prompt_messages or []), []).append(answer)
    turns = []
    for position, message in enumerate(history):
        turn: dict[str, Any] = {"role": message["role"], "content": message["content"]}
        if message["role"] == "assistant":
            siblings = [a for a in by_prompt_length.get(position, []) if (a.prompt_messages or []) == history[:position]]
            same = [a for a in siblings if a.completion_text == message["content"]]
            corrected = [a for a in siblings if corrections.get(a.id) == message["content"]]
            source = (same or corrected or [None])[-1]
            if source is not None:
                turn.update(completion_id=source.id, model=source.model_name, finish_reason=source.finish_reason)
                if not same:
                    turn["original"] = source.completion_text
        turns.append(turn)
    return turns


def _votes_of(completion_id: str | None, votes: Sequence[sa.Row]) -> dict[str, Any]:
    """The user's live thumbs, rating and correction on one completion (None where there is none)."""
    mine = {v.kind: v for v in votes if completion_id is not None and v.completion_id == completion_id}
    return {"thumbs": mine["thumbs"].up if "thumbs" in mine else None,
            "rating": mine["rating"].rating if "rating" in mine else None,
            "correction": mine["correction"].correction if "correction" in mine else None}
