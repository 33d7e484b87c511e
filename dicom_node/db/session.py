"""Engine construction with the dialect settings durability needs; no queries here.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk when it returns) and a
busy timeout, and every transaction starts with ``BEGIN IMMEDIATE`` so concurrent writers
queue on the busy timeout instead of failing on a lock upgrade.  PostgreSQL is used through
psycopg 3 (``postgresql+psycopg://``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, busy_timeout_ms: int = 30000) -> Engine:
    """Create the one engine of a process for ``url``."""
    if url.startswith("sqlite"):
        return _sqlite_engine(url, busy_timeout_ms)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_engine(url: str, busy_timeout_ms: int) -> Engine:
    database = url.split("///", 1)[-1]
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module so we can issue BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A read-only scope (read_scope) begins deferred: in WAL mode a reader never holds
        # the write lock, so a long read (the drift monitor's windows) cannot stall a C-STORE.
        deferred = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

    return engine


READ_ONLY = "dicom_node_read_only"


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextlib.contextmanager
def read_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction that only reads (rolled back at the end): on SQLite it does not take
    the write lock, so writers are not kept waiting while it runs."""
    session = factory()
    try:
        session.connection(execution_options={READ_ONLY: True})
        yield session
    finally:
        session.rollback()
        session.close()
