"""Audit rows written while the database is down are spooled (fsynced, 0600) and written once,
in order, with their original times, when it answers again; a drain run twice (a crash
between its commit and its unlink) makes no second row.

Real databases only: a PostgreSQL cluster of each test that is stopped and started again,
and a SQLite file another connection holds locked.
"""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.spool import AuditSpool, attach_spool, drain, pending_events, tick_drain
from dicom_node.audit.trail import list_audit, read_audit, record_audit_safely
from dicom_node.db.migrate import upgrade
from dicom_node.db.models import AuditEvent
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from tests.conftest import REPO
from tests.helpers import PostgresCluster

PATIENT_ID = "SPOOL-PID-7"
CANARY_NAME = "Spoolcanary^Petra"
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def _spooling_factory(
    url: str, root: Path, busy_timeout_ms: int = 30000
) -> tuple[Any, sessionmaker[Session], AuditSpool]:
    engine = make_engine(url, busy_timeout_ms)
    upgrade(engine)
    factory = make_session_factory(engine)
    spool = AuditSpool.under(root)
    attach_spool(factory, spool)
    return engine, factory, spool


def _record(factory: sessionmaker[Session], count: int) -> list[bool]:
    return [
        record_audit_safely(
            factory,
            event_type="instances.received",
            now=T0 + timedelta(seconds=i),
            patient_id=PATIENT_ID,
            study_instance_uid=f"1.2.3.{i}",
            sequence=i,
            patient_name=CANARY_NAME,
        )
        for i in range(count)
    ]


def _rows(factory: sessionmaker[Session]) -> list[Any]:
    with session_scope(factory) as session:
        return read_audit(session, limit=1000)


def _assert_all_in_order_once(factory: sessionmaker[Session], count: int) -> None:
    rows = _rows(factory)
    assert [row.details["sequence"] for row in rows] == list(range(count))  # in id order
    assert [row.created_at for row in rows] == [T0 + timedelta(seconds=i) for i in range(count)]
    assert {row.patient_id for row in rows} == {PATIENT_ID}
    with session_scope(factory) as session:
        uuids = session.scalars(select(AuditEvent.event_uuid)).all()
    assert len(set(uuids)) == len(uuids) == count and None not in uuids


def test_50_audit_rows_during_a_postgresql_outage_are_written_once_in_order_when_it_returns(
    own_postgres: PostgresCluster, tmp_path: Path
) -> None:
    stop_server, start_server = own_postgres.stop, own_postgres.start
    engine, factory, spool = _spooling_factory(own_postgres.url, tmp_path)
    try:
        stop_server()
        assert _record(factory, 50) == [True] * 50  # durable in the spool, not lost
        assert pending_events(spool) == 50
        tick_drain(spool, factory)  # the database still refuses: everything stays
        assert pending_events(spool) == 50
        # The spool holds what the row would (the patient's ID), never the name.
        text = "".join(path.read_text() for path in spool.directory.iterdir())
        assert PATIENT_ID in text and "Spoolcanary" not in text
        assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in spool.directory.iterdir()} == {0o600}

        start_server()
        assert drain(spool, factory) == 50
        assert drain(spool, factory) == 0
        assert pending_events(spool) == 0 and list(spool.directory.iterdir()) == []
        _assert_all_in_order_once(factory, 50)
    finally:
        engine.dispose()


def test_a_drain_interrupted_after_its_commit_writes_no_second_row(
    own_postgres: PostgresCluster, tmp_path: Path
) -> None:
    stop_server, start_server = own_postgres.stop, own_postgres.start
    engine, factory, spool = _spooling_factory(own_postgres.url, tmp_path)
    try:
        stop_server()
        assert _record(factory, 20) == [True] * 20
        (spooled,) = spool.directory.iterdir()
        kept = spooled.read_bytes()
        start_server()
        assert drain(spool, factory) == 20
        # A crash after the commit but before the unlink leaves the file: drained again.
        spooled.write_bytes(kept)
        spooled.chmod(0o600)
        assert drain(spool, factory) == 0
        assert list(spool.directory.iterdir()) == []
        _assert_all_in_order_once(factory, 20)
    finally:
        engine.dispose()


def test_audit_rows_while_another_connection_locks_the_sqlite_file_are_spooled_then_written(
    tmp_path: Path,
) -> None:
    database = tmp_path / "node.db"
    engine, factory, spool = _spooling_factory(
        f"sqlite:///{database}", tmp_path, busy_timeout_ms=100
    )
    locker = sqlite3.connect(database, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # another process's long write transaction
        assert _record(factory, 10) == [True] * 10
        assert pending_events(spool) == 10
        tick_drain(spool, factory)
        assert pending_events(spool) == 10
        locker.execute("ROLLBACK")
        tick_drain(spool, factory)
        assert pending_events(spool) == 0
        _assert_all_in_order_once(factory, 10)
    finally:
        locker.close()
        engine.dispose()


def test_a_refused_row_is_not_spooled(tmp_path: Path) -> None:
    """A row the database refuses (not an outage) is logged as lost, as before: spooling it
    would only block the rows behind it."""
    engine, factory, spool = _spooling_factory(f"sqlite:///{tmp_path / 'node.db'}", tmp_path)
    try:
        with pytest.raises(ValueError):
            record_audit_safely(factory, event_type="x", now=T0, outcome="maybe")
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        assert record_audit_safely(factory, event_type="x", now=T0) is False
        assert pending_events(spool) == 0
    finally:
        engine.dispose()


_CHILD = """
import sys
from datetime import datetime, timezone
from pathlib import Path
from dicom_node.audit.trail import audit_values
from dicom_node.audit.spool import AuditSpool, append_event
spool = AuditSpool.under(Path(sys.argv[1]))
for i in range(3):
    append_event(spool, audit_values(event_type="security.alert", outcome="failure",
                 now=datetime(2026, 11, 30, 23, 0, i, tzinfo=timezone.utc),
                 event_uuid=f"{i:032x}", reason="association_rejected", sequence=i))
"""


def test_a_node_writes_what_an_ended_process_spooled_before_its_own_start_row(
    node_factory: Any, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    subprocess.run([sys.executable, "-c", _CHILD, str(root)], check=True, cwd=REPO)
    assert pending_events(AuditSpool.under(root)) == 3  # its process has ended
    node = node_factory()
    assert pending_events(AuditSpool.under(root)) == 0
    with session_scope(node.session_factory) as session:
        events = list(reversed(list_audit(session)))
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 4
    assert [(e.event_type, e.details.get("sequence")) for e in events] == [
        ("security.alert", 0),
        ("security.alert", 1),
        ("security.alert", 2),
        ("application.started", None),
    ]
    assert events[0].created_at == datetime(2026, 11, 30, 23, 0, 0, tzinfo=UTC)
