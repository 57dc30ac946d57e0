"""The feedback store: who asked, which model version answered, what they said about it.

- :mod:`~alignloop.feedback.store`: :class:`FeedbackStore`, the API the server and CLI use (and
  re-exports of everything below that callers need);
- :mod:`~alignloop.feedback.entities`: the records it takes and returns, its errors, its checks;
- :mod:`~alignloop.feedback.writer`: group commit, every write acknowledged after its COMMIT;
- :mod:`~alignloop.feedback.database`: engines (SQLite WAL, PostgreSQL) and ``upgrade``;
- :mod:`~alignloop.feedback.schema` and ``migrations/``: the tables and the Alembic revisions
  that create them;
- :mod:`~alignloop.feedback.datasets`: the votes → training sets (pairs, kto, sft, ratings) by
  documented rules, for export and the closed loop alike.
"""
