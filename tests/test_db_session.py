"""Engines and transactions (dicom_node.db.session): on SQLite, the writers of one process take
turns on the engine's writer lock, so many at once all commit and none is told "database is
locked" while another only holds the lock briefly; a turn ends with every way a transaction
ends."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from dicom_node.clock import utcnow
from dicom_node.db.migrate import upgrade
from dicom_node.db.models import Event
from dicom_node.db.session import make_engine, make_session_factory, read_scope, session_scope
from dicom_node.events import record_event

WRITERS = 20
EVENTS_EACH = 10


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}", busy_timeout_ms=30000)
    upgrade(engine)
    return engine


def _count_events(engine: Engine) -> int:
    with read_scope(make_session_factory(engine)) as session:
        return int(session.scalar(select(func.count()).select_from(Event)) or 0)


def test_many_writers_at_once_all_commit(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    factory = make_session_factory(engine)
    start = threading.Barrier(WRITERS)

    def write(writer: int) -> None:
        start.wait(timeout=30)
        for number in range(EVENTS_EACH):
            with session_scope(factory) as session:
                record_event(session, "test.write", now=utcnow(), writer=writer, number=number)

    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(write, range(WRITERS)))  # any OperationalError is raised here
        assert _count_events(engine) == WRITERS * EVENTS_EACH
    finally:
        engine.dispose()


def test_a_writer_that_gets_no_turn_within_the_busy_timeout_is_told_the_database_is_locked(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}", busy_timeout_ms=200)
    upgrade(engine)
    factory = make_session_factory(engine)
    holding, done = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with session_scope(factory) as session:
            record_event(session, "test.long", now=utcnow())
            session.flush()
            holding.set()
            done.wait(timeout=30)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert holding.wait(timeout=30)
        with pytest.raises(OperationalError, match="database is locked"):
            with session_scope(factory) as session:
                record_event(session, "test.refused", now=utcnow())
    finally:
        done.set()
        holder.join()
    with session_scope(factory) as session:  # the turn came back with the commit
        record_event(session, "test.after", now=utcnow())
    assert _count_events(engine) == 2
    engine.dispose()


def test_a_rolled_back_or_read_only_transaction_gives_the_turn_back(sqlite_engine: Engine) -> None:
    factory = make_session_factory(sqlite_engine)
    with pytest.raises(RuntimeError):
        with session_scope(factory) as session:
            record_event(session, "test.rolled_back", now=utcnow())
            session.flush()
            raise RuntimeError("the caller failed")
    with read_scope(factory) as session:  # a reader takes no turn at all
        session.scalar(select(func.count()).select_from(Event))
        with session_scope(factory) as writer:  # so a writer meanwhile is not kept waiting
            record_event(writer, "test.beside_reader", now=utcnow())
    with sqlite_engine.connect() as connection:  # closed without commit: the pool rolls back
        connection.execute(select(func.count()).select_from(Event))
    with session_scope(factory) as session:
        record_event(session, "test.last", now=utcnow())
    assert _count_events(sqlite_engine) == 2
    sqlite_engine.dispose()
