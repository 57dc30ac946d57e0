"""Alembic migrations of the feedback store, run by :func:`alignloop.feedback.store.upgrade`
(``alignloop db upgrade``); no alembic.ini needed."""
