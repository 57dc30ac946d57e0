"""The feedback store on SQLite and on a real PostgreSQL: migrations, users and keys, completions,
every feedback kind, vote replacement, idempotency, ownership, group commit under concurrency and
after a crash, export to training records, and the CLI around it.

PostgreSQL tests use the server at $ALIGNLOOP_TEST_PG (default
postgresql+psycopg://postgres@127.0.0.1:5432/test), each in a fresh schema dropped afterwards, and
skip saying why when none answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import threading
from datetime import timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
import sqlalchemy as sa
import torch

from alignloop.feedback.store import (
    CompletionRecord,
    FeedbackInput,
    FeedbackStore,
    IdempotencyConflict,
    Invalid,
    NotFound,
    PredictionRecord,
    StoreError,
    head_revision,
    make_engine,
    resolve_db_url,
    upgrade,
)

@pytest.fixture
def db_url(any_db_url: str) -> str:
    return any_db_url


@pytest.fixture
def store(db_url: str) -> Iterator[FeedbackStore]:
    upgrade(db_url)
    feedback_store = FeedbackStore(db_url)
    yield feedback_store
    feedback_store.close()


def completion(cid: str, user_id: int, text: str = "Paris.", prompt: str = "Capital of France?",
               version: str = "v1", chat: bool = True, conversation_id: str | None = None,
               messages: list[dict] | None = None) -> CompletionRecord:
    messages = messages or [{"role": "user", "content": prompt}]
    return CompletionRecord(
        id=cid, request_id=cid.rsplit("-", 1)[0], choice_index=0, user_id=user_id, model_name="tiny",
        model_version=version, endpoint="chat" if chat else "completion",
        prompt_messages=messages if chat else None, prompt_text=None if chat else prompt,
        rendered_prompt=f"<|user|>{messages[-1]['content'] if chat else prompt}<|assistant|>",
        prompt_tokens=7, completion_text=text, completion_token_ids=[5, 6, 7], finish_reason="stop",
        sampling={"temperature": 0.7, "top_p": 1.0, "max_tokens": 16, "stop": None, "seed": 1, "n": 1},
        latency_ms=12.5, ttft_ms=3.25, conversation_id=conversation_id,
    )


@pytest.fixture
def people(store: FeedbackStore) -> dict[str, Any]:
    """Two users, one registered model and two chat completions (same prompt) for each user."""
    store.register_model("tiny", "v1", "/models/tiny")
    alice_key, bob_key = store.add_user("alice"), store.add_user("bob")
    alice, bob = store.user_by_key(alice_key), store.user_by_key(bob_key)
    store.add_completions([completion("chatcmpl-a-0", alice.id, "Paris."),
                           completion("chatcmpl-a-1", alice.id, "Lyon.")])
    store.add_completions([completion("chatcmpl-b-0", bob.id, "Paris.")])
    return {"alice": alice, "bob": bob, "alice_key": alice_key}


# A float32 probability as the server computes it: exact only if stored as a double.
JOY = float(torch.tensor(0.925, dtype=torch.float32))


def classified(pid: str, user_id: int, shown: str = "joy", version: str = "c1") -> PredictionRecord:
    probs = {"anger": 0.02, "joy": 0.95, "optimism": 0.02, "sadness": 0.01}
    return PredictionRecord(id=pid, request_id=pid.rsplit("-", 1)[0], user_id=user_id, model_name="emotion",
                            model_version=version, task="classification", input_text="what a day", input_tokens=None,
                            shown=shown, best="joy", entities=None, probabilities=probs, propensity=JOY,
                            exploration={"method": "epsilon", "epsilon": 0.1})


def tagged(pid: str, user_id: int, version: str = "c1") -> PredictionRecord:
    """'Barack Obama visited Paris': PER over words 0-1 shown (p 0.9·0.8), LOC over word 3 (p 0.7)."""
    words = ["Barack", "Obama", "visited", "Paris"]
    shown = ["B-PER", "I-PER", "O", "B-LOC"]
    word_p = [0.9, 0.8, 0.95, 0.7]
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    probabilities = [{t: (p if t == s else (1 - p) / 6) for t in tags} for s, p in zip(shown, word_p)]
    entities = [{"type": "PER", "start": 0, "end": 12, "text": "Barack Obama", "word_start": 0, "word_end": 2, "propensity": 0.9 * 0.8},
                {"type": "LOC", "start": 21, "end": 26, "text": "Paris", "word_start": 3, "word_end": 4, "propensity": 0.7}]
    return PredictionRecord(id=pid, request_id=pid.rsplit("-", 1)[0], user_id=user_id, model_name="ner",
                            model_version=version, task="ner", input_text=" ".join(words), input_tokens=words,
                            shown=shown, best=shown, entities=entities, probabilities=probabilities,
                            propensity=0.9 * 0.8 * 0.95 * 0.7, exploration={"method": "epsilon", "epsilon": 0.1})


def count(db_url: str, table: str) -> int:
    engine = make_engine(db_url)
    with engine.connect() as conn:
        n = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
    engine.dispose()
    return n


# migrations ----------------------------------------------------------------------------------

def test_store_refuses_an_unmigrated_database_until_upgraded(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        with pytest.raises(StoreError, match="alignloop db upgrade --db"):
            FeedbackStore(db_url)  # no file yet
        Path(sa.make_url(db_url).database).touch()  # an empty file: a database without tables
    with pytest.raises(StoreError, match=r"has no alignloop schema; run `alignloop db upgrade --db "):
        FeedbackStore(db_url)

    assert upgrade(db_url) == head_revision()
    assert upgrade(db_url) == head_revision()  # a second upgrade changes nothing
    engine = make_engine(db_url)
    tables = set(sa.inspect(engine).get_table_names())
    assert {"users", "models", "conversations", "messages", "completions", "feedback", "idempotency_keys"} <= tables
    FeedbackStore(db_url).close()

    with engine.begin() as conn:  # as if the database were migrated by an older alignloop
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0000'"))
    engine.dispose()
    with pytest.raises(StoreError, match=rf"schema revision 0000, this alignloop needs {head_revision()}; run `alignloop db upgrade"):
        FeedbackStore(db_url)


def test_migrations_create_exactly_the_orm_schema(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from alignloop.feedback.schema import Base

    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == []


# users ---------------------------------------------------------------------------------------

def test_user_keys_work_and_only_their_hash_is_stored(store: FeedbackStore, db_url: str) -> None:
    key = store.add_user("alice", admin=True)
    alice = store.user_by_key(key)
    assert alice is not None and alice.name == "alice" and alice.admin
    assert store.user_by_key(key + "x") is None
    assert store.user_by_key("") is None

    engine = make_engine(db_url)
    with engine.connect() as conn:
        stored = [str(v) for row in conn.execute(sa.text("SELECT * FROM users")) for v in row]
    engine.dispose()
    assert hashlib.sha256(key.encode()).hexdigest() in stored
    assert not any(key in value for value in stored)

    with pytest.raises(StoreError, match="already exists") as e:
        store.add_user("alice")
    assert e.value.field == "name"
    with pytest.raises(Invalid):
        store.add_user("  ")

    anonymous = store.ensure_user("anonymous")
    assert store.ensure_user("anonymous") == anonymous
    assert not anonymous.admin
    assert [u.name for u in store.list_users()] == ["alice", "anonymous"]


# completions ---------------------------------------------------------------------------------

def test_completions_round_trip_with_their_provenance(store: FeedbackStore, db_url: str) -> None:
    store.register_model("tiny", "v1", "/models/tiny")
    store.register_model("tiny", "v1", "/models/tiny")  # idempotent on the version
    user = store.ensure_user("alice")
    chat = completion("chatcmpl-1-0", user.id, conversation_id="conv-1")
    plain = completion("cmpl-2-0", user.id, chat=False, prompt="Once upon a time")
    store.add_completions([chat, plain])

    assert store.get_completion("chatcmpl-1-0") == chat
    assert store.get_completion("cmpl-2-0") == plain
    assert store.get_completion("chatcmpl-1-0").created_at.tzinfo == timezone.utc
    assert store.get_completion("nope") is None

    # the next turn resends the history: only its new messages are appended to the conversation
    history = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
               {"role": "user", "content": "And of Italy?"}]
    store.add_completions([completion("chatcmpl-3-0", user.id, "Rome.", conversation_id="conv-1", messages=history)])
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT position, role, content FROM messages WHERE conversation_id = 'conv-1' "
                                    "ORDER BY position")).all()
    engine.dispose()
    assert [(r.role, r.content) for r in rows] == [(m["role"], m["content"]) for m in history]

    bob = store.ensure_user("bob")
    with pytest.raises(NotFound) as e:
        store.add_completions([completion("chatcmpl-4-0", bob.id, conversation_id="conv-1")])
    assert e.value.field == "conversation_id"
    with pytest.raises(NotFound) as e:
        store.add_completions([completion("chatcmpl-5-0", user.id, version="unregistered")])
    assert e.value.field == "model_version"
    assert store.get_completion("chatcmpl-4-0") is None


# feedback ------------------------------------------------------------------------------------

FEEDBACK_OF_EACH_KIND = {
    "thumbs": FeedbackInput("thumbs", "chatcmpl-a-0", up=True, comment="right", tags=["geo"]),
    "rating": FeedbackInput("rating", "chatcmpl-a-0", rating=4),
    "pairwise": FeedbackInput("pairwise", "chatcmpl-a-0", other_completion_id="chatcmpl-a-1", verdict="a", left="b"),
    "correction": FeedbackInput("correction", "chatcmpl-a-1", correction="Paris, not Lyon."),
}


@pytest.mark.parametrize("kind", FEEDBACK_OF_EACH_KIND)
def test_each_feedback_kind_round_trips(store: FeedbackStore, people: dict, kind: str) -> None:
    alice, fb = people["alice"], FEEDBACK_OF_EACH_KIND[kind]
    record, outcome = store.put_feedback(alice.id, fb)
    assert outcome == "created" and record.revision == 1
    for name, value in dataclasses.asdict(fb).items():
        assert getattr(record, name) == value, name
    assert record.completion_text == ("Lyon." if kind == "correction" else "Paris.")
    assert record.model_version == "v1"
    assert record.created_at.tzinfo == timezone.utc
    assert store.get_feedback(alice.id, record.id) == record
    assert store.list_feedback(alice.id) == [record]
    assert store.list_feedback(alice.id, kind=kind) == [record]
    other_kind = "rating" if kind != "rating" else "thumbs"
    assert store.list_feedback(alice.id, kind=other_kind) == []


def test_a_second_vote_replaces_the_first(store: FeedbackStore, people: dict, db_url: str) -> None:
    alice = people["alice"]
    first, outcome = store.put_feedback(alice.id, FeedbackInput("thumbs", "chatcmpl-a-0", up=True))
    assert outcome == "created"
    second, outcome = store.put_feedback(alice.id, FeedbackInput("thumbs", "chatcmpl-a-0", up=False))
    assert outcome == "replaced"
    assert (second.id, second.revision, second.up) == (first.id, 2, False)
    assert second.created_at == first.created_at and second.updated_at > first.updated_at
    assert store.list_feedback(alice.id) == [second]

    # pairwise: B-vs-A is the same comparison as A-vs-B
    ab, _ = store.put_feedback(alice.id, FeedbackInput("pairwise", "chatcmpl-a-0", other_completion_id="chatcmpl-a-1",
                                                       verdict="a"))
    ba, outcome = store.put_feedback(alice.id, FeedbackInput("pairwise", "chatcmpl-a-1",
                                                             other_completion_id="chatcmpl-a-0", verdict="b"))
    assert outcome == "replaced" and ba.id == ab.id and ba.revision == 2
    assert count(db_url, "feedback") == 2

    # other kinds on the same completion are separate votes
    _, outcome = store.put_feedback(alice.id, FeedbackInput("rating", "chatcmpl-a-0", rating=2))
    assert outcome == "created"


def test_an_idempotent_retry_writes_nothing(store: FeedbackStore, people: dict, db_url: str) -> None:
    alice, bob = people["alice"], people["bob"]
    fb = FeedbackInput("rating", "chatcmpl-a-0", rating=5)
    record, outcome = store.put_feedback(alice.id, fb, idempotency_key="req-1")
    assert outcome == "created"
    again, outcome = store.put_feedback(alice.id, fb, idempotency_key="req-1")
    assert outcome == "replayed" and again == record
    assert store.get_feedback(alice.id, record.id).revision == 1
    assert count(db_url, "feedback") == 1

    with pytest.raises(IdempotencyConflict) as e:
        store.put_feedback(alice.id, FeedbackInput("rating", "chatcmpl-a-0", rating=1), idempotency_key="req-1")
    assert e.value.field == "idempotency_key"
    assert store.get_feedback(alice.id, record.id).rating == 5

    # keys belong to their user
    _, outcome = store.put_feedback(bob.id, FeedbackInput("rating", "chatcmpl-b-0", rating=5), idempotency_key="req-1")
    assert outcome == "created"


def test_feedback_on_someone_elses_completion_is_not_found(store: FeedbackStore, people: dict) -> None:
    alice = people["alice"]
    for fb, field in [
        (FeedbackInput("thumbs", "chatcmpl-b-0", up=True), "completion_id"),
        (FeedbackInput("thumbs", "chatcmpl-missing", up=True), "completion_id"),
        (FeedbackInput("pairwise", "chatcmpl-a-0", other_completion_id="chatcmpl-b-0", verdict="a"),
         "other_completion_id"),
    ]:
        with pytest.raises(NotFound) as e:
            store.put_feedback(alice.id, fb)
        assert e.value.field == field
        assert field in str(e.value)
    assert store.list_feedback(alice.id) == []


@pytest.mark.parametrize(("fb", "field"), [
    (FeedbackInput("stars", "chatcmpl-a-0"), "kind"),
    (FeedbackInput("thumbs", "chatcmpl-a-0"), "up"),
    (FeedbackInput("thumbs", "chatcmpl-a-0", up=True, rating=3), "rating"),
    (FeedbackInput("rating", "chatcmpl-a-0", rating=6), "rating"),
    (FeedbackInput("rating", "chatcmpl-a-0", rating=0), "rating"),
    (FeedbackInput("rating", "chatcmpl-a-0", rating=True), "rating"),
    (FeedbackInput("pairwise", "chatcmpl-a-0", other_completion_id="chatcmpl-a-0", verdict="a"), "other_completion_id"),
    (FeedbackInput("pairwise", "chatcmpl-a-0", verdict="a"), "other_completion_id"),
    (FeedbackInput("pairwise", "chatcmpl-a-0", other_completion_id="chatcmpl-a-1"), "verdict"),
    (FeedbackInput("pairwise", "chatcmpl-a-0", other_completion_id="chatcmpl-a-1", verdict="a", left="c"), "left"),
    (FeedbackInput("correction", "chatcmpl-a-0", correction="  "), "correction"),
    (FeedbackInput("thumbs", "chatcmpl-a-0", up=True, tags=[""]), "tags"),
])
def test_invalid_values_name_the_field(store: FeedbackStore, people: dict, fb: FeedbackInput, field: str) -> None:
    with pytest.raises(Invalid) as e:
        store.put_feedback(people["alice"].id, fb)
    assert e.value.field == field
    assert f"'{field}'" in str(e.value)


def test_users_delete_their_own_feedback_only(store: FeedbackStore, people: dict) -> None:
    alice, bob = people["alice"], people["bob"]
    record, _ = store.put_feedback(alice.id, FeedbackInput("thumbs", "chatcmpl-a-0", up=True))
    assert store.get_feedback(bob.id, record.id) is None
    assert store.delete_feedback(bob.id, record.id) is False
    assert store.get_feedback(alice.id, record.id) == record
    assert store.delete_feedback(alice.id, record.id) is True
    assert store.get_feedback(alice.id, record.id) is None
    assert store.delete_feedback(alice.id, record.id) is False
    _, outcome = store.put_feedback(alice.id, FeedbackInput("thumbs", "chatcmpl-a-0", up=True))
    assert outcome == "created"  # a deleted vote leaves no live vote to replace


# group commit --------------------------------------------------------------------------------

def test_a_closed_store_refuses_writes(db_url: str) -> None:
    upgrade(db_url)
    store = FeedbackStore(db_url)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.add_user("late")


def test_concurrent_writes_are_all_acknowledged_and_present(store: FeedbackStore, people: dict, db_url: str) -> None:
    threads, per_thread = 32, 20
    alice = people["alice"]
    ids = [[f"chatcmpl-c{t}x{i}-0" for i in range(per_thread)] for t in range(threads)]
    store.add_completions([completion(cid, alice.id) for part in ids for cid in part])
    acknowledged: list[int] = []
    errors: list[BaseException] = []

    def vote(t: int) -> None:
        try:
            for i, cid in enumerate(ids[t]):
                record, outcome = store.put_feedback(alice.id, FeedbackInput("rating", cid, rating=1 + i % 5))
                assert outcome == "created"
                acknowledged.append(record.id)
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=vote, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert len(set(acknowledged)) == threads * per_thread
    engine = make_engine(db_url)
    with engine.connect() as conn:
        stored = set(conn.execute(sa.text("SELECT id FROM feedback")).scalars())
    engine.dispose()
    assert stored == set(acknowledged)


def test_many_feedback_items_answer_one_by_one_and_share_transactions(store: FeedbackStore, people: dict,
                                                                       db_url: str) -> None:
    alice = people["alice"]
    ids = [f"chatcmpl-m{i}-0" for i in range(40)]
    store.add_completions([completion(cid, alice.id) for cid in ids])
    items = [(FeedbackInput("rating", cid, rating=1 + i % 5), f"key-{i}") for i, cid in enumerate(ids)]
    items.insert(3, (FeedbackInput("thumbs", "chatcmpl-b-0", up=True), None))  # bob's: refused alone
    items.insert(7, (FeedbackInput("rating", ids[0], rating=9), None))  # out of range: refused alone
    batches_before = store._writer.batches
    answers = store.put_feedback_many(alice.id, items)
    assert len(answers) == len(items)
    assert isinstance(answers[3], NotFound) and answers[3].field == "completion_id"
    assert isinstance(answers[7], StoreError) and answers[7].field == "rating"
    good = [a for i, a in enumerate(answers) if i not in (3, 7)]
    assert [outcome for _, outcome in good] == ["created"] * 40
    assert [record.completion_id for record, _ in good] == ids
    assert store._writer.batches - batches_before <= 2  # queued together, committed together
    assert count(db_url, "feedback") == 40

    # the same batch again: every good item replays its key, nothing is written twice
    again = store.put_feedback_many(alice.id, items)
    assert [a[1] for i, a in enumerate(again) if i not in (3, 7)] == ["replayed"] * 40
    assert [a[0] for i, a in enumerate(again) if i not in (3, 7)] == [record for record, _ in good]
    assert count(db_url, "feedback") == 40


def test_a_failed_batch_is_retried_so_one_bad_write_fails_alone(db_url: str) -> None:
    from alignloop.feedback.writer import GroupCommitWriter

    upgrade(db_url)
    FeedbackStore(db_url).close()
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (name, admin, created_at) VALUES ('taken', false, CURRENT_TIMESTAMP)"))
    writer = GroupCommitWriter(engine)
    gate = threading.Event()
    results: dict[str, Any] = {}

    def insert_user(name: str) -> Any:
        return lambda conn: conn.execute(sa.text("INSERT INTO users (name, admin, created_at) "
                                                 "VALUES (:name, false, CURRENT_TIMESTAMP)"), {"name": name})

    def submit(label: str, write: Any) -> None:
        try:
            results[label] = writer.submit(write)
        except Exception as e:
            results[label] = e

    blocker = threading.Thread(target=submit, args=("gate", lambda conn: gate.wait()))
    blocker.start()
    while writer._queue.qsize():  # the writer has taken the gate write and waits in it
        pass
    batch = [threading.Thread(target=submit, args=(name, insert_user(name))) for name in ("carol", "taken", "dave")]
    for worker in batch:
        worker.start()
    while writer._queue.qsize() < 3:  # all three queued: they will share one transaction
        pass
    gate.set()
    for worker in [blocker, *batch]:
        worker.join()
    writer.close()

    assert isinstance(results["taken"], sa.exc.IntegrityError)
    assert not isinstance(results["carol"], Exception) and not isinstance(results["dave"], Exception)
    with engine.connect() as conn:
        names = set(conn.execute(sa.text("SELECT name FROM users")).scalars())
    engine.dispose()
    assert names == {"taken", "carol", "dave"}


CRASH_SCRIPT = textwrap.dedent("""
    import sys, threading
    from alignloop.feedback.store import CompletionRecord, FeedbackInput, FeedbackStore
    store = FeedbackStore(sys.argv[1])
    user = store.ensure_user("burst")
    store.register_model("tiny", "v1", "/models/tiny")
    ids = [f"chatcmpl-k{i}-0" for i in range(4000)]
    store.add_completions([CompletionRecord(id=i, request_id=i[:-2], choice_index=0, user_id=user.id, model_name="tiny",
        model_version="v1", endpoint="completion", prompt_messages=None, prompt_text="p", rendered_prompt="p",
        prompt_tokens=1, completion_text="c", completion_token_ids=[1], finish_reason="stop", sampling={},
        latency_ms=1.0, ttft_ms=None) for i in ids])
    lock = threading.Lock()
    def vote(part):
        for cid in part:
            record, _ = store.put_feedback(user.id, FeedbackInput("thumbs", cid, up=True))
            with lock:
                print(record.id, flush=True)
    threads = [threading.Thread(target=vote, args=(ids[t::16],)) for t in range(16)]
    for t in threads: t.start()
    for t in threads: t.join()
""")


def test_acknowledged_writes_survive_sigkill(db_url: str) -> None:
    """Kill the writing process mid-burst: every write it acknowledged is in the database."""
    upgrade(db_url)
    acknowledged = []
    with subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, db_url], stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            acknowledged.append(int(line))
            if len(acknowledged) == 500:
                proc.send_signal(signal.SIGKILL)
                break
        acknowledged += [int(line) for line in proc.stdout.read().split()]  # printed before the kill landed
    assert proc.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 500
    FeedbackStore(db_url).close()  # opens after the crash
    engine = make_engine(db_url)
    with engine.connect() as conn:
        stored = set(conn.execute(sa.text("SELECT id FROM feedback")).scalars())
    engine.dispose()
    assert set(acknowledged) <= stored


# export --------------------------------------------------------------------------------------

def put_votes_of_every_kind(store: FeedbackStore) -> None:
    """alice's votes of every kind and verdict on chat and plain completions of two model versions,
    one comparison across different prompts among them."""
    store.register_model("tiny", "v1", "/models/tiny")
    store.register_model("tiny", "v2", "/models/tiny-ppo")
    user = store.ensure_user("alice")
    same = [completion(f"chatcmpl-s{i}-0", user.id, text, version=version)
            for i, (text, version) in enumerate([("Paris.", "v1"), ("Lyon.", "v2"), ("Nice.", "v1"), ("Metz.", "v2")])]
    plain = [completion(f"cmpl-p{i}-0", user.id, text, chat=False, prompt="2+2=") for i, text in enumerate(["4", "5"])]
    elsewhere = completion("chatcmpl-e-0", user.id, "Rome.", prompt="Capital of Italy?")
    store.add_completions([*same, *plain, elsewhere])

    def put(kind: str, cid: str, **fields: Any) -> None:
        store.put_feedback(user.id, FeedbackInput(kind, cid, **fields))

    put("pairwise", "chatcmpl-s0-0", other_completion_id="chatcmpl-s1-0", verdict="a", left="a")
    put("pairwise", "chatcmpl-s2-0", other_completion_id="chatcmpl-s3-0", verdict="b", left="b")
    put("pairwise", "cmpl-p0-0", other_completion_id="cmpl-p1-0", verdict="a")
    put("pairwise", "chatcmpl-s0-0", other_completion_id="chatcmpl-s2-0", verdict="tie")
    put("pairwise", "chatcmpl-s1-0", other_completion_id="chatcmpl-s3-0", verdict="both_bad")
    put("pairwise", "chatcmpl-s0-0", other_completion_id="chatcmpl-e-0", verdict="a")  # different prompts
    put("correction", "chatcmpl-s1-0", correction="Paris.")
    put("correction", "cmpl-p1-0", correction="4")
    put("thumbs", "chatcmpl-s0-0", up=True)
    put("thumbs", "cmpl-p1-0", up=False)
    put("rating", "chatcmpl-s0-0", rating=5)
    put("rating", "cmpl-p0-0", rating=4)
    store.register_model("emotion", "c1", "/models/emotion")
    store.add_predictions([classified("pred-x-0", user.id), tagged("pred-y-0", user.id)])
    store.put_feedback(user.id, FeedbackInput("prediction", prediction_id="pred-x-0", correct=False, label="sadness"))
    store.put_feedback(user.id, FeedbackInput("prediction", prediction_id="pred-y-0", correct=True))


def test_export_of_each_kind_is_valid_training_data(store: FeedbackStore, db_url: str, tmp_path: Path) -> None:
    from alignloop.data.load import read_rows
    from alignloop.data.records import validate_rows

    put_votes_of_every_kind(store)
    expected_kind = {"pairs": "preference", "kto": "binary", "sft": "prompt_completion", "ratings": "rating"}
    exported = {}
    for kind, record_kind in expected_kind.items():
        records, skipped = store.export(kind)
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        assert validate_rows(read_rows(str(path)), [record_kind], str(path)) == record_kind
        assert all({"feedback_ids", "model_version", "source"} <= r.keys() for r in records)
        exported[kind] = (records, skipped)

    pairs, skipped = exported["pairs"]
    assert skipped == {"tie": 1, "different_prompts": 1, "duplicate_pairs": 2}  # both_bad: two thumbs-down
    as_text = [(r["chosen"] if isinstance(r["chosen"], str) else r["chosen"][0]["content"],
                r["rejected"] if isinstance(r["rejected"], str) else r["rejected"][0]["content"], r["source"])
               for r in pairs]
    # Records come in an order of their content (not of the votes' arrival): compared as sorted here.
    # A correction and a comparison saying the same thing are one pair with both feedback ids.
    assert sorted(as_text) == sorted([("Paris.", "Lyon.", "correction"), ("4", "5", "correction"), ("Metz.", "Nice.", "pairwise")])
    by_chosen = {text[0]: r for text, r in zip(as_text, pairs)}
    assert [by_chosen[c]["feedback_ids"] for c in ("Paris.", "4", "Metz.")] == [[1, 7], [3, 8], [2]]
    assert by_chosen["Paris."]["prompt"] == [{"role": "user", "content": "Capital of France?"}]
    assert by_chosen["Paris."]["chosen"] == [{"role": "assistant", "content": "Paris."}]
    assert (by_chosen["Metz."]["model_version"], by_chosen["Metz."]["rejected_model_version"]) == ("v2", "v1")
    assert by_chosen["4"]["prompt"] == "2+2=" and by_chosen["4"]["chosen"] == "4"

    kto, _ = exported["kto"]
    assert sorted((r["label"], r["feedback_ids"], r["source"]) for r in kto) == sorted([
        (False, [5], "pairwise"), (False, [5], "pairwise"), (True, [9], "thumbs"), (False, [10], "thumbs")])
    sft, _ = exported["sft"]
    assert sorted(json.dumps(r["completion"]) for r in sft) == sorted(json.dumps(c) for c in [[{"role": "assistant", "content": "Paris."}], "4"])
    ratings, _ = exported["ratings"]
    assert sorted((r["rating"], r["user"]) for r in ratings) == [(4, "alice"), (5, "alice")]

    with pytest.raises(Invalid) as e:
        store.export("dpo")
    assert e.value.field == "kind"


def test_cli_export_writes_what_the_loop_trains_on(store: FeedbackStore, db_url: str, tmp_path: Path) -> None:
    """For the same stored votes and rules (the defaults), `alignloop feedback export --kind K`
    writes exactly the records the closed loop's export step writes for its stages to train on."""
    from alignloop.cli import main
    from alignloop.config import STAGES, LoopConfig
    from alignloop.feedback.datasets import RECORD_KINDS
    from alignloop.loop.pipeline import Loop

    put_votes_of_every_kind(store)
    bob = store.ensure_user("bob")
    store.add_completions([completion("chatcmpl-t0-0", bob.id, "Paris."), completion("chatcmpl-t1-0", bob.id, "Lyon.")])
    # bob agrees with alice's Paris ≻ Lyon on his own pair, and his thumbs-down on Lyon beside
    # her thumbs-up on Paris (same prompt) is a sibling pair: the dedupe and sibling rules run too.
    store.put_feedback(bob.id, FeedbackInput("pairwise", "chatcmpl-t1-0", other_completion_id="chatcmpl-t0-0", verdict="b"))
    store.put_feedback(bob.id, FeedbackInput("thumbs", "chatcmpl-t1-0", up=False))

    iteration = tmp_path / "loop" / "iter-1"
    iteration.mkdir(parents=True)
    Loop(LoopConfig(), tmp_path / "loop", None, store).export(1, iteration, {"start": {"version": "v1"}, "steps": {}})

    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    assert {stage.loop_data for stage in STAGES.values() if stage.loop_data} - {"prompts"} <= set(RECORD_KINDS)
    for kind in RECORD_KINDS:
        out = tmp_path / "cli" / f"{kind}.jsonl"
        assert main(["feedback", "export", "--kind", kind, "--out", str(out), "--db", db_url]) == 0
        trained_on = read(iteration / "datasets" / f"{kind}.jsonl")
        assert trained_on and read(out) == trained_on
    # Paris ≻ Lyon: alice's comparison (1) and correction (7), bob's comparison (15), and alice's
    # thumbs-up (9) beside bob's thumbs-down (16), merged into one record (13, 14: her predictions).
    pairs = read(iteration / "datasets" / "pairs.jsonl")
    assert sorted((r["source"], r["feedback_ids"]) for r in pairs) == [("correction", [1, 7, 9, 15, 16]), ("correction", [3, 8]),
                                                                       ("pairwise", [2])]


def test_the_sets_do_not_depend_on_the_order_votes_arrived_in(store: FeedbackStore) -> None:
    """Concurrent users' votes are stored in whatever order their threads wrote them; the same
    votes in any order give the same records, in the same order (so the loop is reproducible)."""
    import random

    from alignloop.feedback.datasets import RECORD_KINDS, DatasetRules, build_datasets

    put_votes_of_every_kind(store)
    votes = store.votes()
    first = build_datasets(votes, DatasetRules())
    for seed in range(3):
        shuffled = list(votes)
        random.Random(seed).shuffle(shuffled)
        again = build_datasets(shuffled, DatasetRules())
        for kind in RECORD_KINDS:
            # Which vote's id comes first inside a merged record may follow arrival; the records do not.
            strip = lambda records: [{**r, "feedback_ids": sorted(r["feedback_ids"])} for r in records]  # noqa: E731
            assert strip(getattr(again, kind)) == strip(getattr(first, kind)), kind


# CLI -----------------------------------------------------------------------------------------

def test_cli_upgrades_adds_users_and_exports(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from alignloop.cli import main

    assert main(["users", "list", "--db", db_url]) == 2
    assert "alignloop db upgrade --db" in capsys.readouterr().err

    assert main(["db", "upgrade", "--db", db_url]) == 0
    assert main(["users", "add", "alice", "--admin", "--db", db_url]) == 0
    key = capsys.readouterr().out.strip()
    assert main(["users", "add", "bob", "--db", db_url]) == 0
    capsys.readouterr()
    assert main(["users", "add", "bob", "--db", db_url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert main(["users", "list", "--db", db_url]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "bob" in listing and key not in listing

    with FeedbackStore(db_url) as store:
        alice = store.user_by_key(key)
        assert alice is not None and alice.admin
        store.register_model("tiny", "v1", "/models/tiny")
        store.add_completions([completion("chatcmpl-a-0", alice.id, "Paris."),
                               completion("chatcmpl-a-1", alice.id, "Lyon.")])
        store.put_feedback(alice.id, FeedbackInput("pairwise", "chatcmpl-a-0", other_completion_id="chatcmpl-a-1",
                                                   verdict="a"))
    out = tmp_path / "out" / "pairs.jsonl"
    assert main(["feedback", "export", "--kind", "pairs", "--out", str(out), "--db", db_url]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [("Paris.", "Lyon.")]


def test_the_database_url_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIGNLOOP_DB", raising=False)
    assert resolve_db_url(None) == "sqlite:///feedback.db"
    monkeypatch.setenv("ALIGNLOOP_DB", "postgresql+psycopg://me@db/feedback")
    assert resolve_db_url(None) == "postgresql+psycopg://me@db/feedback"
    assert resolve_db_url("sqlite:///other.db") == "sqlite:///other.db"


# the model registry --------------------------------------------------------------------------

def test_registry_records_lineage_evaluation_and_deployment(store: FeedbackStore) -> None:
    store.register_model("base", "v0", "/runs/sft/final")
    store.register_trained("base", "v1", "/runs/loop-1/final", parent_version="v0", run_dir="/runs/loop-1",
                           datasets={"pairs": 12}, feedback=[(3, "ann", "pairwise"), (5, "bob", "thumbs")])
    # Rerunning an interrupted iteration adds nothing twice.
    store.register_trained("base", "v1", "/runs/loop-1/final", parent_version="v0", run_dir="/runs/loop-1",
                           datasets={"pairs": 12}, feedback=[(3, "ann", "pairwise"), (5, "bob", "thumbs")])
    store.register_trained("base", "v2", "/runs/loop-2/final", parent_version="v1", run_dir="/runs/loop-2",
                           datasets={"pairs": 4}, feedback=[(9, "ann", "rating")])
    store.record_evaluation("v1", {"win_rate": 0.7, "promoted": True})
    store.deploy("v0")
    store.deploy("v1")
    models = {m["version"]: m for m in store.models()}
    assert [m["version"] for m in store.models()] == ["v0", "v1", "v2"]
    assert [models[v]["deployed"] for v in ("v0", "v1", "v2")] == [False, True, False]
    assert models["v1"]["parent_version"] == "v0" and models["v1"]["datasets"] == {"pairs": 12}
    assert models["v1"]["evaluation"]["win_rate"] == 0.7 and models["v1"]["feedback_rows"] == 2
    assert models["v1"]["promoted_at"] is not None and models["v2"]["promoted_at"] is None
    assert store.lineage("v1") == [{"feedback_id": 3, "user_name": "ann", "kind": "pairwise"},
                                   {"feedback_id": 5, "user_name": "bob", "kind": "thumbs"}]
    assert store.reached_by("ann") == ["v1", "v2"] and store.reached_by("bob") == ["v1"] and store.reached_by("cy") == []
    store.deploy("v0")  # a rollback is one call
    assert [m["version"] for m in store.models() if m["deployed"]] == ["v0"]
    with pytest.raises(NotFound, match="not registered"):
        store.lineage("v9")
    with pytest.raises(NotFound, match="parent_version"):
        store.register_trained("base", "v3", "/x", parent_version="nope", run_dir="/x", datasets={}, feedback=[])


def test_deploying_a_version_leaves_other_names_deployed(store: FeedbackStore) -> None:
    """A server with a chat model and a classifier has one deployed version of each."""
    store.register_model("base", "v0", "/runs/sft/final")
    store.register_model("base", "v1", "/runs/loop-1/final")
    store.register_model("emotion", "c0", "/runs/classify/final")
    for version in ("v0", "c0", "v1"):
        store.deploy(version)
    assert {m["version"]: m["deployed"] for m in store.models()} == {"v0": False, "v1": True, "c0": True}


def test_registry_commands(tmp_path: Path) -> None:
    from alignloop.cli import main

    url = f"sqlite:///{tmp_path}/registry.db"
    upgrade(url)
    with FeedbackStore(url) as store:
        store.register_model("base", "v0", "/runs/sft/final")
        store.register_trained("base", "v1", "/runs/loop-1/final", parent_version="v0", run_dir="/runs/loop-1",
                               datasets={}, feedback=[(4, "ann", "thumbs")])
    assert main(["deploy", "v1", "--db", url]) == 0
    assert main(["lineage", "v9", "--db", url]) == 2  # an unknown version: one line, exit 2
    assert main(["lineage", "--db", url]) == 2  # neither a version nor a user
    with FeedbackStore(url) as store:
        assert [m["version"] for m in store.models() if m["deployed"]] == ["v1"]


def test_registry_command_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from alignloop.cli import main

    url = f"sqlite:///{tmp_path}/registry.db"
    upgrade(url)
    with FeedbackStore(url) as store:
        store.register_model("base", "v0", "/runs/sft/final")
        store.register_trained("base", "v1", "/runs/loop-1/final", parent_version="v0", run_dir="/runs/loop-1",
                               datasets={}, feedback=[(4, "ann", "thumbs"), (7, "bob", "pairwise")])
    assert main(["lineage", "v1", "--db", url]) == 0
    assert [line.split() for line in capsys.readouterr().out.splitlines()[1:]] == [["4", "thumbs", "ann"], ["7", "pairwise", "bob"]]
    assert main(["lineage", "--user", "bob", "--db", url]) == 0
    assert capsys.readouterr().out.split() == ["v1"]
    assert main(["models", "--db", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "v0" and lines[2].split()[:3] == ["v1", "v0", "2"]


# predictions (served classifiers) -------------------------------------------------------------

@pytest.fixture
def predicted(store: FeedbackStore) -> dict[str, Any]:
    """alice's classification and NER predictions, and one classification of bob's."""
    store.register_model("emotion", "c1", "/models/emotion")
    alice, bob = store.ensure_user("alice"), store.ensure_user("bob")
    store.add_predictions([classified("pred-a-0", alice.id), tagged("pred-a-1", alice.id)])
    store.add_predictions([classified("pred-b-0", bob.id)])
    return {"alice": alice, "bob": bob}


def test_predictions_round_trip_with_exact_propensities(store: FeedbackStore, predicted: dict) -> None:
    for pid, expected in (("pred-a-0", classified("pred-a-0", predicted["alice"].id)),
                          ("pred-a-1", tagged("pred-a-1", predicted["alice"].id))):
        stored = store.get_prediction(pid)
        assert stored is not None
        assert stored.propensity == expected.propensity  # bit for bit: 1/propensity is an importance weight
        assert stored.probabilities == expected.probabilities and stored.entities == expected.entities
        assert dataclasses.replace(stored, created_at=expected.created_at) == expected
    assert store.get_prediction("pred-missing") is None
    assert store.get_prediction("pred-a-0").propensity == JOY
    with pytest.raises(Invalid) as e:
        store.add_predictions([dataclasses.replace(classified("pred-z-0", predicted["alice"].id), propensity=0.0)])
    assert e.value.field == "propensity"
    with pytest.raises(NotFound) as e:
        store.add_predictions([classified("pred-z-0", predicted["alice"].id, version="c9")])
    assert e.value.field == "model_version"


def test_prediction_feedback_is_one_live_vote_and_idempotent(store: FeedbackStore, predicted: dict, db_url: str) -> None:
    alice = predicted["alice"]
    first, outcome = store.put_feedback(alice.id, FeedbackInput("prediction", prediction_id="pred-a-0", correct=True),
                                        idempotency_key="k1")
    assert outcome == "created" and first.model_version == "c1" and first.completion_id is None
    again, outcome = store.put_feedback(alice.id, FeedbackInput("prediction", prediction_id="pred-a-0", correct=True),
                                        idempotency_key="k1")
    assert outcome == "replayed" and again == first
    second, outcome = store.put_feedback(alice.id, FeedbackInput("prediction", prediction_id="pred-a-0", correct=False,
                                                                 label="sadness", comment="not joy"))
    assert outcome == "replaced" and (second.id, second.revision, second.label) == (first.id, 2, "sadness")
    assert store.get_feedback(alice.id, first.id) == second
    assert store.list_feedback(alice.id, kind="prediction") == [second]
    assert count(db_url, "feedback") == 1
    assert store.get_feedback(predicted["bob"].id, first.id) is None
    assert store.delete_feedback(predicted["bob"].id, first.id) is False
    assert store.delete_feedback(alice.id, first.id) is True


@pytest.mark.parametrize(("fb", "error", "field"), [
    (FeedbackInput("prediction", prediction_id="pred-b-0", correct=True), NotFound, "prediction_id"),
    (FeedbackInput("prediction", prediction_id="pred-missing", correct=True), NotFound, "prediction_id"),
    (FeedbackInput("prediction", correct=True), Invalid, "prediction_id"),
    (FeedbackInput("prediction", prediction_id="pred-a-0"), Invalid, "correct"),
    (FeedbackInput("prediction", "chatcmpl-a-0", prediction_id="pred-a-0", correct=True), Invalid, "completion_id"),
    (FeedbackInput("prediction", prediction_id="pred-a-0", correct=False, label="fear"), Invalid, "label"),
    (FeedbackInput("prediction", prediction_id="pred-a-0", correct=False, label="joy"), Invalid, "label"),
    (FeedbackInput("prediction", prediction_id="pred-a-0", correct=True, label="sadness"), Invalid, "label"),
    (FeedbackInput("prediction", prediction_id="pred-a-0", correct=False, entities=[{"index": 0, "correct": False}]),
     Invalid, "entities"),
    (FeedbackInput("prediction", prediction_id="pred-a-1", correct=False, entities=[{"index": 2, "correct": False}]),
     Invalid, "entities"),
    (FeedbackInput("prediction", prediction_id="pred-a-1", correct=False,
                   entities=[{"index": 0, "correct": False, "label": "CITY"}]), Invalid, "entities"),
    (FeedbackInput("prediction", prediction_id="pred-a-1", correct=True, entities=[{"index": 0, "correct": False}]),
     Invalid, "entities"),
    (FeedbackInput("prediction", prediction_id="pred-a-1", correct=False, label="PER"), Invalid, "label"),
    (FeedbackInput("thumbs", prediction_id="pred-a-0", up=True), Invalid, "prediction_id"),
])
def test_prediction_feedback_refusals_name_the_field(store: FeedbackStore, predicted: dict, fb: FeedbackInput,
                                                     error: type, field: str) -> None:
    with pytest.raises(error) as e:
        store.put_feedback(predicted["alice"].id, fb)
    assert e.value.field == field and f"'{field}'" in str(e.value)


def test_prediction_feedback_exports_bandit_records(store: FeedbackStore, predicted: dict) -> None:
    alice, bob = predicted["alice"], predicted["bob"]
    store.add_predictions([classified("pred-a-2", alice.id, shown="anger"), tagged("pred-a-3", alice.id),
                           tagged("pred-a-4", alice.id)])
    put = store.put_feedback
    right, _ = put(alice.id, FeedbackInput("prediction", prediction_id="pred-a-0", correct=True))
    wrong, _ = put(alice.id, FeedbackInput("prediction", prediction_id="pred-a-2", correct=False))
    named, _ = put(bob.id, FeedbackInput("prediction", prediction_id="pred-b-0", correct=False, label="optimism"))
    ner, _ = put(alice.id, FeedbackInput("prediction", prediction_id="pred-a-1", correct=False, entities=[
        {"index": 0, "correct": True}, {"index": 1, "correct": False, "label": "ORG"}]))
    all_right, _ = put(alice.id, FeedbackInput("prediction", prediction_id="pred-a-3", correct=True))
    put(alice.id, FeedbackInput("prediction", prediction_id="pred-a-4", correct=False))  # which entity is wrong: unsaid

    records, skipped = store.export("bandit")
    assert skipped.get("unjudged_entities") == 1
    by_feedback = {}
    for r in records:
        by_feedback.setdefault(r["feedback_ids"][0], []).append(r)
    common = {"model_version": "c1", "source": "prediction"}
    assert by_feedback[right.id] == [{"text": "what a day", "shown": "joy", "propensity": JOY, "reward": 1.0, "label": "joy",
                                      "prediction_id": "pred-a-0", "feedback_ids": [right.id], "user": "alice", **common}]
    assert by_feedback[wrong.id][0]["reward"] == 0.0 and "label" not in by_feedback[wrong.id][0]
    assert by_feedback[named.id][0] | {} == {"text": "what a day", "shown": "joy", "propensity": JOY, "reward": 0.0,
                                             "label": "optimism", "prediction_id": "pred-b-0", "feedback_ids": [named.id],
                                             "user": "bob", **common}
    words = ["Barack", "Obama", "visited", "Paris"]
    assert by_feedback[ner.id] == [
        {"tokens": words, "start": 0, "end": 2, "shown": "PER", "propensity": 0.9 * 0.8, "reward": 1.0, "label": "PER",
         "prediction_id": "pred-a-1", "feedback_ids": [ner.id], "user": "alice", **common},
        {"tokens": words, "start": 3, "end": 4, "shown": "LOC", "propensity": 0.7, "reward": 0.0, "label": "ORG",
         "prediction_id": "pred-a-1", "feedback_ids": [ner.id], "user": "alice", **common}]
    assert [(r["shown"], r["reward"], r["label"]) for r in by_feedback[all_right.id]] == [("PER", 1.0, "PER"), ("LOC", 1.0, "LOC")]
    assert len(records) == 7


def test_cli_exports_bandit_records(store: FeedbackStore, predicted: dict, db_url: str, tmp_path: Path) -> None:
    from alignloop.cli import main

    store.put_feedback(predicted["alice"].id, FeedbackInput("prediction", prediction_id="pred-a-0", correct=True))
    out = tmp_path / "bandit.jsonl"
    assert main(["feedback", "export", "--kind", "bandit", "--out", str(out), "--db", db_url]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["shown"], r["propensity"], r["reward"]) for r in rows] == [("joy", JOY, 1.0)]


def test_upgrade_from_0002_keeps_the_data(db_url: str) -> None:
    """A store with users, a model, completions and votes at 0002 comes through 0003 whole, and
    then takes predictions and feedback on them."""
    from alembic import command

    from alignloop.feedback.database import _alembic_config

    engine = make_engine(db_url, create=True)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0002")
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id, name, key_hash, admin, created_at) VALUES (1, 'ann', NULL, false, :t)"),
                     {"t": "2026-12-01 00:00:00"})
        conn.execute(sa.text("INSERT INTO models (version, name, path, created_at, deployed) VALUES ('v1', 'tiny', '/m', :t, true)"),
                     {"t": "2026-12-01 00:00:00"})
        conn.execute(sa.text(
            "INSERT INTO completions (id, request_id, choice_index, user_id, model_name, model_version, endpoint, prompt_text, "
            "rendered_prompt, prompt_tokens, completion_text, completion_token_ids, finish_reason, sampling, latency_ms, created_at) "
            "VALUES ('cmpl-1-0', 'cmpl-1', 0, 1, 'tiny', 'v1', 'completion', '2+2=', '2+2=', 3, '4', '[1]', 'stop', '{}', 1.5, :t)"),
            {"t": "2026-12-01 00:00:00"})
        for thumb in (False, True):  # two votes, ids from the table's own sequence; the first is deleted
            conn.execute(sa.text(
                "INSERT INTO feedback (user_id, kind, target, completion_id, up, tags, revision, created_at, updated_at) "
                "VALUES (1, 'thumbs', :target, 'cmpl-1-0', :up, '[]', 1, :t, :t)"),
                {"t": "2026-12-01 00:00:00", "up": thumb, "target": f"cmpl-1-0{'' if thumb else ' old'}"})
        conn.execute(sa.text("DELETE FROM feedback WHERE up = false"))
    engine.dispose()

    assert upgrade(db_url) == head_revision()
    with FeedbackStore(db_url) as store:
        ann = store.ensure_user("ann")
        [vote] = store.list_feedback(ann.id)
        assert (vote.id, vote.kind, vote.up, vote.completion_id, vote.completion_text) == (2, "thumbs", True, "cmpl-1-0", "4")
        store.register_model("emotion", "c1", "/models/emotion")
        store.add_predictions([classified("pred-u-0", ann.id)])
        record, _ = store.put_feedback(ann.id, FeedbackInput("prediction", prediction_id="pred-u-0", correct=True))
        assert record.id == 3  # the table (on SQLite, its copy) kept its ids and its sequence
        assert [r["shown"] for r in store.export("bandit")[0]] == ["joy"]
        assert [r["completion"] for r in store.export("kto")[0]] == ["4"]
