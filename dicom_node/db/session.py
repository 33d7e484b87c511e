"""Engine construction with the dialect settings durability needs; no queries here.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk when it returns) and a
busy timeout, and every transaction starts with ``BEGIN IMMEDIATE`` so concurrent writers
queue instead of failing on a lock upgrade.  Within one process they queue on the engine's
own writer lock (:class:`WriterTurnConnection`), taken before ``BEGIN IMMEDIATE`` and given up
when the transaction ends: SQLite's busy handler polls with sleeps that grow to 100 ms, so
twenty association threads waiting on it left the database idle between writers and could
starve one past the timeout.  Other processes (the CLI, a backup) still meet the busy timeout.
PostgreSQL is used through psycopg 3 (``postgresql+psycopg://``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, busy_timeout_ms: int = 30000) -> Engine:
    """Create the one engine of a process for ``url``."""
    if url.startswith("sqlite"):
        return _sqlite_engine(url, busy_timeout_ms)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class WriterTurnConnection(sqlite3.Connection):
    """A sqlite3 connection that takes its engine's writer lock for a write transaction and
    gives it up once the transaction has ended (commit, rollback or close).

    Subclassed per engine by :func:`writer_turn_class`, which sets ``writer_lock``.
    """

    writer_lock: threading.Lock

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holds_writer_lock = False

    def take_writer_turn(self, timeout_seconds: float) -> bool:
        """Wait (at most ``timeout_seconds``) until no other connection of the engine writes."""
        if not self.holds_writer_lock:
            self.holds_writer_lock = self.writer_lock.acquire(timeout=timeout_seconds)
        return self.holds_writer_lock

    def end_writer_turn(self) -> None:
        if self.holds_writer_lock:
            self.holds_writer_lock = False
            self.writer_lock.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.end_writer_turn()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.end_writer_turn()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.end_writer_turn()


def writer_turn_class(writer_lock: threading.Lock) -> type[WriterTurnConnection]:
    """The connection class of one engine: its connections share ``writer_lock``."""
    return type("EngineWriterTurnConnection", (WriterTurnConnection,), {"writer_lock": writer_lock})


def _sqlite_engine(url: str, busy_timeout_ms: int) -> Engine:
    database = url.split("///", 1)[-1]
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={
            "timeout": busy_timeout_ms / 1000,
            "check_same_thread": False,
            "factory": writer_turn_class(threading.Lock()),
        },
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
        if connection.get_execution_options().get(READ_ONLY, False):
            connection.exec_driver_sql("BEGIN")
            return
        _begin_writing(connection, busy_timeout_ms / 1000)

    return engine


def _begin_writing(connection: Any, timeout_seconds: float) -> None:
    """``BEGIN IMMEDIATE`` once this engine's writer lock is ours (the busy timeout bounds the
    wait, as SQLite's own: "database is locked" when it runs out)."""
    dbapi_connection = connection.connection.driver_connection
    if not dbapi_connection.take_writer_turn(timeout_seconds):
        raise OperationalError(
            "BEGIN IMMEDIATE",
            None,
            sqlite3.OperationalError("database is locked (no writer turn within busy_timeout)"),
        )
    try:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        dbapi_connection.end_writer_turn()
        raise


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
