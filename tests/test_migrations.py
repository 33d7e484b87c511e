"""Alembic migrations on SQLite and PostgreSQL: up, down, up; no drift; append-only events;
an upgrade from every earlier revision keeps its data, and the rollback to the previous
release's head keeps the data that schema holds (and the CLI does both)."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, inspect, select, text
from sqlalchemy.exc import DBAPIError

from dicom_node.clock import utcnow
from dicom_node.db import validation as validation_tables
from dicom_node.db.migrate import current_revision, downgrade, head_revision, require_head, upgrade
from dicom_node.db.models import Base
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.errors import DatabaseNotMigratedError
from dicom_node.events import record_event
from tests.helpers import free_port, run_cli, write_config

TABLES = {"studies", "series", "instances", "jobs", "events"} | {
    table.name for table in validation_tables.Base.metadata.sorted_tables
}


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


# --- Upgrades from every earlier revision, and the rollback to the previous release -----------

T = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
STUDY, SERIES, SOP, OUTPUT = "1.2.3", "1.2.3.1", "1.2.3.1.1", "1.2.3.9"
# One row per table, every column as of the oldest revision that has it, in foreign-key order.
# Seeding at revision R inserts only the tables and columns R has.
SEED_ROWS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "studies",
        {
            "study_instance_uid": STUDY,
            "revision": 1,
            "closed_revision": 1,
            "first_received_at": T,
            "last_received_at": T,
            "instance_count": 1,
            "patient_name": "SEED^PATIENT",
            "patient_id": "SEED-1",
            "patient_birth_date": "19700101",
            "patient_sex": "F",
            "patient_age": "055Y",
            "accession_number": "ACC1",
            "study_date": "20260101",
            "study_time": "120000",
            "study_description": "CHEST",
        },
    ),
    (
        "series",
        {
            "series_instance_uid": SERIES,
            "study_instance_uid": STUDY,
            "modality": "DX",
            "series_number": "1",
            "series_description": "PA",
        },
    ),
    (
        "instances",
        {
            "sop_instance_uid": SOP,
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
            "series_instance_uid": SERIES,
            "study_instance_uid": STUDY,
            "study_revision": 1,
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "path": f"instances/{STUDY}/{SERIES}/{SOP}.dcm",
            "size_bytes": 10,
            "sha256": "a" * 64,
            "received_at": T,
            "calling_ae_title": "TEST_SCU",
            "modality": "DX",
            "view_position": "PA",
            "body_part_examined": "CHEST",
            "image_type": "ORIGINAL\\PRIMARY",
            "rows": 10,
            "columns": 10,
            "field_of_view_mm": 430.0,
        },
    ),
    (
        "jobs",
        {
            "id": 1,
            "kind": "analysis",
            "state": "done",
            "study_instance_uid": STUDY,
            "study_revision": 1,
            "target": "",
            "attempts": 1,
            "max_attempts": 3,
            "lease_owner": None,
            "lease_token": None,
            "lease_expires_at": None,
            "next_attempt_at": None,
            "last_error": None,
            "reason": None,
            "superseded_by": None,
            "created_at": T,
            "updated_at": T,
        },
    ),
    (
        "events",
        {
            "id": 1,
            "created_at": T,
            "name": "study.closed",
            "level": "info",
            "study_instance_uid": STUDY,
            "sop_instance_uid": None,
            "job_id": 1,
            "detail": "{}",
        },
    ),
    (
        "job_claims",
        {
            "id": 1,
            "job_id": 1,
            "attempt": 1,
            "worker_id": "w1",
            "lease_token": "t1",
            "claimed_at": T,
        },
    ),
    (
        "analysis_results",
        {
            "job_id": 1,
            "study_instance_uid": STUDY,
            "sop_instance_uid": SOP,
            "model_name": "densenet121-res224-all",
            "model_version": "1",
            "weights_sha256": "b" * 64,
            "weights_status": "verified",
            "thresholds_source": "model",
            "notes": None,
            "created_at": T,
        },
    ),
    (
        "findings",
        {
            "id": 1,
            "job_id": 1,
            "label": "Pneumothorax",
            "probability": 0.5,
            "threshold": 0.3,
            "positive": True,
            "boxes": "[[1, 2, 3, 4]]",
            "heatmap_path": f"results/{STUDY}/job-1-attempt-1.npz#pneumothorax",
        },
    ),
    (
        "outputs",
        {
            "sop_instance_uid": OUTPUT,
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34",
            "study_instance_uid": STUDY,
            "series_instance_uid": "1.2.3.8",
            "study_revision": 1,
            "job_id": 1,
            "kind": "sr",
            "label": None,
            "path": f"outputs/{STUDY}/1.2.3.8/{OUTPUT}-job1a1.dcm",
            "sha256": "c" * 64,
            "size_bytes": 20,
            "state": "current",
            "created_at": T,
            "superseded_at": None,
        },
    ),
    (
        "deliveries",
        {
            "id": 1,
            "sop_instance_uid": OUTPUT,
            "peer": "pacs",
            "job_id": 1,
            "outcome": "delivered",
            "status_code": 0,
            "detail": None,
            "attempts": 1,
            "updated_at": T,
            "delivered_at": T,
        },
    ),
    (
        "users",
        {
            "id": 1,
            "username": "admin",
            "password_hash": "x",
            "role": "admin",
            "disabled": False,
            "created_at": T,
        },
    ),
    (
        "api_tokens",
        {
            "id": 1,
            "name": "ris",
            "token_sha256": "d" * 64,
            "scope": "read",
            "revoked": False,
            "created_at": T,
            "last_used_at": None,
        },
    ),
    (
        "web_sessions",
        {
            "id_sha256": "e" * 64,
            "user_id": 1,
            "csrf_token": "f" * 32,
            "created_at": T,
            "last_seen_at": T,
        },
    ),
    (
        "feedback",
        {
            "id": 1,
            "study_instance_uid": STUDY,
            "job_id": 1,
            "label": "Pneumothorax",
            "verdict": "agree",
            "comment": None,
            "username": "admin",
            "created_at": T,
        },
    ),
    (
        "audit_events",
        {
            "id": 1,
            "created_at": T,
            "event_type": "study.viewed",
            "username": "admin",
            "outcome": "success",
            "study_instance_uid": STUDY,
            "patient_id": "SEED-1",
            "details": None,
        },
    ),
    (
        "peer_echoes",
        {
            "id": 1,
            "peer": "pacs",
            "checked_at": T,
            "outcome": "success",
            "status_code": 0,
            "detail": None,
            "username": "admin",
        },
    ),
)


def _script() -> ScriptDirectory:
    return ScriptDirectory(str(resources.files("dicom_node.migrations")))


def revisions_before_head() -> list[str]:
    """Every revision but the head, oldest first: each is a schema a site may still run."""
    revisions = [revision.revision for revision in _script().walk_revisions()]
    return list(reversed(revisions[1:]))


def previous_head() -> str:
    """The head of the previous release: the revision just below this release's head."""
    script = _script()
    down = script.get_revision(script.get_current_head()).down_revision
    assert isinstance(down, str), "the head has one parent"
    return down


def _seed(engine: Engine) -> dict[str, dict[str, Any]]:
    """Insert SEED_ROWS as far as the database's schema has them; returns what went in."""
    metadata = MetaData()
    metadata.reflect(engine)
    seeded = {}
    with engine.begin() as connection:
        for name, row in SEED_ROWS:
            if name in metadata.tables:
                table = metadata.tables[name]
                values = {key: value for key, value in row.items() if key in table.columns}
                connection.execute(table.insert().values(values))
                seeded[name] = values
    return seeded


def _normal(value: Any) -> Any:
    """Datetimes as naive UTC: SQLite hands back what it stored, without the zone."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def _assert_kept(engine: Engine, seeded: dict[str, dict[str, Any]]) -> None:
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.connect() as connection:
        for name, values in seeded.items():
            table = metadata.tables[name]
            rows = [dict(row._mapping) for row in connection.execute(select(table))]
            assert len(rows) == 1, f"{name}: {len(rows)} rows"
            kept = {key: _normal(rows[0][key]) for key in values if key in table.columns}
            assert kept == {key: _normal(values[key]) for key in kept}, name


@pytest.mark.parametrize("start", revisions_before_head())
def test_upgrade_from_each_earlier_revision_keeps_its_data(db_url: str, start: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, start)
        seeded = _seed(engine)
        assert "studies" in seeded and "instances" in seeded
        upgrade(engine)
        assert current_revision(engine) == head_revision(engine)
        _assert_kept(engine, seeded)
    finally:
        engine.dispose()


def test_downgrade_to_the_previous_head_keeps_the_data_that_schema_holds(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, previous_head())
        seeded = _seed(engine)
        assert set(seeded) == {name for name, _ in SEED_ROWS}, "a table of the seed is gone"
        upgrade(engine)
        downgrade(engine, previous_head())
        assert current_revision(engine) == previous_head()
        _assert_kept(engine, seeded)
        upgrade(engine)  # and forward again: the rollback is not a dead end
        _assert_kept(engine, seeded)
    finally:
        engine.dispose()


def test_cli_downgrades_to_the_previous_release_and_upgrades_back(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "node.toml", root=tmp_path / "store", db_url="", port=free_port()
    )
    assert run_cli(config, "db", "upgrade").returncode == 0
    down = run_cli(config, "db", "downgrade", previous_head())
    assert down.returncode == 0, down.stderr[-2000:]
    assert f"database at revision {previous_head()}" in down.stdout
    refused = run_cli(config, "status")
    assert refused.returncode == 1 and "dicom-node db upgrade" in refused.stderr
    up = run_cli(config, "db", "upgrade")
    assert up.returncode == 0 and "(head)" in up.stdout
