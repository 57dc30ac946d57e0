"""Group commit: many threads' writes, few transactions, each caller answered after its COMMIT.

A commit is the expensive part of a small write (an fsync on PostgreSQL, the WAL append and lock
hand-off on SQLite), so one writer thread drains the queue and runs up to ``max_batch`` queued
writes in one transaction. Every caller blocks on its own future, resolved only once the
transaction holding its write has committed: an acknowledged write is a durable write.

A write is a function of a connection inside an open transaction. It must raise its expected
errors (:class:`~alignloop.feedback.store.StoreError`) *before* it changes anything: such an
error fails that caller alone and the batch goes on. Any other error (a constraint the checks
did not foresee, a lost connection) rolls the batch back; its writes are then retried one
transaction each, so the bad write fails alone and the others still commit.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

import sqlalchemy as sa

from alignloop.errors import AlignloopError

log = logging.getLogger(__name__)

Write = Callable[[sa.Connection], Any]


class WriterStopped(RuntimeError):
    """The writer is closed (or died): the write was not run."""


class GroupCommitWriter:
    """One thread that owns the write connection; :meth:`submit` is safe from any thread."""

    def __init__(self, engine: sa.Engine, expected_errors: type[Exception] = AlignloopError,
                 max_batch: int = 256) -> None:
        self.engine = engine
        self.expected_errors = expected_errors
        self.max_batch = max_batch
        self.batches = 0  # transactions committed, for benchmarks and tests
        self._queue: queue.SimpleQueue[tuple[Write, Future] | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # orders submit() against close()
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()

    def submit(self, write: Write) -> Any:
        """Run ``write`` in the next batch; return its result once that batch has committed."""
        return self.enqueue(write).result()

    def enqueue(self, write: Write) -> Future:
        """Queue ``write`` without waiting: the future resolves once its batch has committed (a
        caller with many writes queues them all, then waits, so they share transactions)."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise WriterStopped("the feedback store is closed")
            self._queue.put((write, future))
        return future

    def close(self) -> None:
        """Finish the queued writes, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug or a dead database: fail the waiting callers, never hang them
            log.exception("feedback writer stopped")
            with self._lock:
                self._closed = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                if item is not None:
                    item[1].set_exception(WriterStopped(f"the feedback writer stopped: {e}"))

    def _loop(self) -> None:
        with self.engine.connect() as conn:
            stopping = False
            while not stopping:
                item = self._queue.get()
                batch: list[tuple[Write, Future]] = []
                while item is not None:
                    batch.append(item)
                    if len(batch) >= self.max_batch:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                stopping = item is None
                if batch:
                    self._run_batch(conn, batch)

    def _run_batch(self, conn: sa.Connection, batch: list[tuple[Write, Future]]) -> None:
        outcomes: list[tuple[Future, bool, Any]] = []
        try:
            with conn.begin():
                for write, future in batch:
                    try:
                        outcomes.append((future, True, write(conn)))
                    except self.expected_errors as e:
                        outcomes.append((future, False, e))
        except Exception as e:
            if len(batch) == 1:
                batch[0][1].set_exception(e)
                return
            log.warning("feedback writer: a batch of %d writes failed (%s); retrying them one by one", len(batch), e)
            for item in batch:
                self._run_batch(conn, [item])
            return
        self.batches += 1
        for future, ok, value in outcomes:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
