"""Alembic migrations on SQLite and PostgreSQL: up, down, up; no drift; append-only events."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DBAPIError

from dicom_node.clock import utcnow
from dicom_node.db.migrate import current_revision, downgrade, head_revision, upgrade
from dicom_node.db.models import Base
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.errors import DatabaseNotMigratedError
from dicom_node.events import record_event
from dicom_node.db.migrate import require_head

TABLES = {"studies", "series", "instances", "jobs", "events"}


def test_upgrade_downgrade_upgrade_round_trip(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        assert current_revision(engine) == head_revision(engine)
        assert TABLES <= set(inspect(engine).get_table_names())
        downgrade(engine, "base")
        assert current_revision(engine) is None
        assert not TABLES & set(inspect(engine).get_table_names())
        upgrade(engine)
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_models_and_migrations_do_not_drift(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_unmigrated_database_is_refused_with_the_fixing_command(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with pytest.raises(DatabaseNotMigratedError, match="dicom-node db upgrade"):
            require_head(engine)
    finally:
        engine.dispose()


def test_events_table_is_append_only(engine: Engine) -> None:
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        record_event(session, "test.event", now=utcnow(), reason="kept")
    for statement in ("UPDATE events SET name = 'changed'", "DELETE FROM events"):
        with pytest.raises(DBAPIError, match="append-only"):
            with engine.begin() as connection:
                connection.execute(text(statement))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM events")).scalars().all() == ["test.event"]


def test_sqlite_runs_in_wal_mode_with_full_synchronous(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        engine.dispose()
