"""Connecting to the feedback database and migrating it: SQLite files and PostgreSQL URLs, the
SQLite settings that make group commit durable and fast, and Alembic run from inside the package
(``migrations/``, no alembic.ini).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa

from alignloop.feedback.entities import Invalid, StoreError, Unavailable

DEFAULT_DB_URL = "sqlite:///feedback.db"
URL_FORMS = "sqlite:///FILE or postgresql+psycopg://USER@HOST/DB"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def resolve_db_url(url: str | None) -> str:
    """``url``, else ``$ALIGNLOOP_DB``, else :data:`DEFAULT_DB_URL`."""
    return url or os.environ.get("ALIGNLOOP_DB") or DEFAULT_DB_URL


def shown_url(url: str) -> str:
    """The URL as it may appear in a message or a log: the password masked."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


DURABILITY = ("normal", "full")


def make_engine(url: str, create: bool = False, durability: str = "normal") -> sa.Engine:
    """An engine for a ``sqlite:///FILE`` or PostgreSQL URL (``postgresql://`` means psycopg 3).

    SQLite connections get WAL, foreign keys, a busy timeout and ``synchronous=`` ``durability``:
    ``normal`` (a commit is in the WAL file, the OS holds it: survives a kill -9 of the server,
    not a power cut or an OS crash) or ``full`` (each commit is fsynced: survives those too;
    group commit pays one fsync per batch of writes). PostgreSQL commits are always flushed
    (its ``synchronous_commit=on``); the setting does not apply. SQLite connections run
    their own BEGIN: the writer's is ``BEGIN IMMEDIATE`` so it takes the write lock up front and
    waits on ``busy_timeout`` instead of failing when another process writes. Without ``create``
    a missing SQLite file is an error rather than a new empty database.
    """
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise StoreError(f"{url!r}: not a database URL; use {URL_FORMS}") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        # Connections above pool_size are closed after use and reopened on the next burst; the
        # server reads from up to 40 worker threads at once (Starlette's thread pool).
        return sa.create_engine(parsed, pool_pre_ping=True, pool_size=20, max_overflow=30)
    if durability not in DURABILITY:
        raise StoreError(f"durability must be one of {', '.join(DURABILITY)}, got {durability!r}", field="db_durability")
    if backend != "sqlite":
        raise StoreError(f"{shown_url(url)}: unsupported database; use {URL_FORMS}")
    if not parsed.database or parsed.database == ":memory:":
        raise StoreError(f"{url}: an in-memory SQLite database cannot be shared or migrated; "
                         "give a file, sqlite:///feedback.db")
    path = Path(parsed.database)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # owner-only, like an SSH key: it holds people's words and key hashes (SQLite gives its -wal and -shm files the same mode)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    elif not path.is_file():
        raise StoreError(f"{url}: no database file at {path}; create it with `alignloop db upgrade --db {url}`")
    # A SQLite connection is a file handle: keep one per concurrent reader (up to Starlette's 40
    # worker threads) instead of reopening overflow connections, each with its PRAGMAs, per read.
    engine = sa.create_engine(parsed, connect_args={"check_same_thread": False}, pool_size=40, max_overflow=10)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite's own implicit BEGINs off: see "begin" below
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", f"synchronous={durability.upper()}", "foreign_keys=ON", "busy_timeout=10000"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("sqlite_immediate") else "BEGIN")

    return engine


@contextmanager
def scratch_postgres_schema(url: str, prefix: str = "alignloop_scratch") -> Iterator[str]:
    """A URL for a fresh, uniquely named schema in the PostgreSQL database at ``url`` (its
    ``search_path``), dropped with everything in it afterwards: isolated stores for tests and
    benchmarks that can run side by side and again."""
    import uuid

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def _alembic_config(connection: sa.Connection) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration shipped with this alignloop."""
    with _quiet_alembic():
        from alembic.script import ScriptDirectory

        return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def upgrade(url: str) -> str:
    """Apply the migrations up to the newest (creating the SQLite file if needed); return it."""
    engine = make_engine(url, create=True)
    try:
        with engine.begin() as conn, _quiet_alembic():
            from alembic import command

            command.upgrade(_alembic_config(conn), "head")
    except sa.exc.OperationalError as e:
        raise StoreError(f"{shown_url(url)}: cannot migrate the database ({first_line(e.orig)})") from None
    finally:
        engine.dispose()
    return head_revision()


def current_revision(engine: sa.Engine) -> str | None:
    """The migration the database is at, None for one alignloop never migrated. Read directly
    from Alembic's table: opening a store should not cost importing Alembic's runtime."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def database_error(e: sa.exc.DBAPIError) -> StoreError:
    """What a driver's error means for the caller: the database is unreachable for now (a dropped
    or refused connection, a restart, a timeout: :class:`Unavailable`, retry) or it refused a
    value the checks did not foresee (:class:`Invalid`). Nothing of the failed transaction was
    committed either way."""
    if e.connection_invalidated or isinstance(e, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return Unavailable(f"the feedback database is unavailable ({first_line(e.orig)}); nothing was written, retry shortly")
    return Invalid(f"the feedback database refused the values ({first_line(e.orig)})")


def first_line(error: BaseException | None) -> str:
    """A driver error's first line (psycopg adds hints on further lines; the CLI prints one)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic logs its plugin set-up and dialect choice at INFO; the CLI reports the outcome."""
    logger = logging.getLogger("alembic")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
