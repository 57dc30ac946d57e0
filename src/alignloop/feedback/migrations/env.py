"""Alembic's entry point for the feedback store.

:func:`alignloop.feedback.store.upgrade` hands over an open connection in
``config.attributes["connection"]``, made by the store's own engine factory (SQLite pragmas,
driver defaults), so a URL is never parsed twice or %-escaped for configparser. Without one
(the plain ``alembic`` command, with ``sqlalchemy.url`` set) an engine is made from the URL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from alignloop.feedback.schema import Base

config = context.config


def run_migrations(connection: sa.Connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        run_migrations(conn)
    engine.dispose()
