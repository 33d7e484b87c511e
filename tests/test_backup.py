"""Backup and restore on SQLite and PostgreSQL: a backup taken while a real node receives,
analyses and delivers, restored into a fresh install, holds every row and file of its
snapshot; damaged, newer and misplaced backups are refused with one line and an exit code."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import MetaData, create_engine, select, text
from sqlalchemy.pool import NullPool

from dicom_node.audit.trail import record_audit
from dicom_node.clock import utcnow
from dicom_node.config.settings import PeerSettings, Settings, WebSettings
from dicom_node.db.migrate import current_revision, head_revision, upgrade
from dicom_node.db.session import make_engine, session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.errors import (
    BackupError,
    BackupIntegrityError,
    BackupSchemaError,
    BackupTargetNotEmptyError,
)
from dicom_node.ops.backup.archive import (
    create_backup,
    read_manifest,
    restore_backup,
    verify_backup,
)
from dicom_node.ops.backup.database import find_pg_tool, libpq_environment
from dicom_node.service import start_node
from dicom_node.web.users import create_token
from tests.conftest import (
    _create_postgres_database,
    _drop_postgres_database,
    make_settings,
    wait_until,
)
from tests.helpers import SCU_AE, echo, free_port, run_cli, send_datasets, write_config
from tests.peers import PACS_AE, ScriptedPacs

# Rows that never change once committed: compared column by column.  The others (job states,
# study counters, delivery outcomes) move on after the snapshot, so only their keys are.
IMMUTABLE = {
    "instances",
    "series",
    "events",
    "audit_events",
    "job_claims",
    "analysis_results",
    "findings",
}


def _rows(url: str) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """Every row of every table, keyed by primary key."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as connection:
            return {
                name: {
                    tuple(row._mapping[c.name] for c in table.primary_key.columns): dict(
                        row._mapping
                    )
                    for row in connection.execute(select(table))
                }
                for name, table in metadata.tables.items()
            }
    finally:
        engine.dispose()


def _without_restore_audit(rows: dict[str, Any]) -> dict[str, Any]:
    """The restored rows less the one audit row the restore itself adds."""
    kept = dict(rows)
    kept["audit_events"] = {
        key: row
        for key, row in rows["audit_events"].items()
        if row["event_type"] != "backup.restored"
    }
    return kept


def _fresh_database(request: pytest.FixtureRequest, db_url: str, folder: Path) -> str:
    """A new, empty database of the same kind: a new SQLite file, or a new PostgreSQL database."""
    if db_url.startswith("sqlite"):
        return f"sqlite:///{folder / 'fresh' / 'node.db'}"
    server = request.getfixturevalue("postgres_server")
    url, name = _create_postgres_database(server)
    request.addfinalizer(lambda: _drop_postgres_database(server, name))
    return url


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _referenced_files(rows: dict[str, Any]) -> set[str]:
    paths = {row["path"] for row in rows["instances"].values() if row.get("purged_at") is None}
    paths |= {row["path"] for row in rows["outputs"].values()}
    paths |= {
        row["heatmap_path"].split("#", 1)[0]
        for row in rows["findings"].values()
        if row["heatmap_path"]
    }
    return paths


class Load:
    """Sends one new study after another to the node until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.sent: list[tuple[float, str]] = []
        self.failed: list[Any] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seed = 100
        while not self.stop.is_set():
            ds = make_cxr_dataset(rows=256, columns=224, patient_id=f"LOAD-{seed}", seed=seed)
            statuses = send_datasets(self.port, [ds])
            if statuses == [0]:
                self.sent.append((time.monotonic(), str(ds.StudyInstanceUID)))
            else:
                self.failed.append(statuses)
            seed += 1
            time.sleep(0.05)

    def sent_between(self, start: float, end: float) -> int:
        return sum(1 for at, _ in self.sent if start <= at <= end)


def _settled(engine: Any, studies: int) -> bool:
    with engine.connect() as connection:
        states = connection.execute(text("SELECT kind, state FROM jobs")).all()
    analyses = [s for k, s in states if k == "analysis"]
    deliveries = [s for k, s in states if k == "delivery"]
    return (
        len(analyses) >= studies
        and len(deliveries) >= studies
        and all(s in ("done", "skipped") for _, s in states)
    )


@pytest.mark.slow
def test_backup_under_load_restores_every_row_and_file_into_a_fresh_install(
    db_url: str, node_factory: Any, models_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pacs = ScriptedPacs()
    request.addfinalizer(pacs.stop)
    peers = (
        PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
        PeerSettings(
            name="pacs", ae_title=PACS_AE, host="127.0.0.1", port=pacs.port, send_results=True
        ),
    )
    node = node_factory(roles=("scp", "worker"), peers=peers)
    first = [make_cxr_dataset(rows=256, columns=224, patient_id=f"P-{i}", seed=i) for i in range(3)]
    for ds in first:
        assert send_datasets(node.scp_port, [ds]) == [0]
    assert wait_until(lambda: _settled(node.engine, 3), timeout=180), "first studies not done"
    with session_scope(node.session_factory) as session:
        token = create_token(session, name="ris", scope="read", now=utcnow())
        record_audit(
            session,
            event_type="study.viewed",
            now=utcnow(),
            username="rad",
            study_instance_uid=str(first[0].StudyInstanceUID),
            patient_id="P-0",
        )

    load = Load(node.scp_port)
    load.thread.start()
    assert wait_until(lambda: len(load.sent) >= 3, timeout=60), load.failed
    before = _rows(db_url)  # everything committed before the backup started
    source_config = write_config(
        tmp_path / "source.toml",
        root=tmp_path / "store",
        db_url=db_url,
        port=free_port(),
        models_dir=models_dir,
    )
    backup = tmp_path / "backup"
    started = time.monotonic()
    created = run_cli(source_config, "backup", "create", str(backup), timeout=300)
    ended = time.monotonic()
    sent_before_end = len(load.sent)
    assert wait_until(lambda: len(load.sent) >= sent_before_end + 2, timeout=60)
    load.stop.set()
    load.thread.join(timeout=60)
    node.stop()
    assert created.returncode == 0, created.stderr[-2000:]
    assert load.sent_between(started, ended) >= 1, "no study arrived while the backup ran"
    assert not load.failed
    after = _rows(db_url)  # the source once the load stopped: a superset of the snapshot

    restored_url = _fresh_database(request, db_url, tmp_path)
    target_root, target_models = tmp_path / "restored", tmp_path / "restored-models"
    target_config = write_config(
        tmp_path / "target.toml",
        root=target_root,
        db_url=restored_url,
        port=free_port(),
        models_dir=target_models,
    )
    restored_run = run_cli(target_config, "backup", "restore", str(backup), timeout=300)
    assert restored_run.returncode == 0, restored_run.stderr[-2000:]

    manifest = json.loads((backup / "manifest.json").read_text())
    restored = _without_restore_audit(_rows(restored_url))
    if db_url.startswith("sqlite"):  # the restored database is the backup's own dump
        assert restored == _rows(f"sqlite:///{backup / 'database.sqlite3'}")
    _assert_snapshot_between(before, restored, after, manifest)
    _assert_files_restored(
        restored, manifest, tmp_path / "store", target_root, models_dir, target_models
    )
    settings = make_settings(
        target_root,
        restored_url,
        target_models,
        peers=peers,
        web=WebSettings(host="127.0.0.1", port=0, refresh_seconds=0),
    )
    _assert_restored_node_serves(settings, str(first[0].StudyInstanceUID), token, restored)


def _assert_snapshot_between(
    before: dict[str, Any],
    restored: dict[str, Any],
    after: dict[str, Any],
    manifest: dict[str, Any],
) -> None:
    """Restored: the manifest's row counts; everything committed before the backup started;
    nothing the source did not hold once the load stopped; unchanged where rows never change."""
    assert {name: len(rows) for name, rows in restored.items()} == manifest["tables"]
    for name, rows in before.items():
        assert set(rows) <= set(restored[name]), f"{name}: committed rows missing"
        if name in IMMUTABLE:
            assert all(restored[name][key] == row for key, row in rows.items()), name
    for name, rows in restored.items():
        assert set(rows) <= set(after[name]), f"{name}: rows the source never had"
        if name in IMMUTABLE:
            assert all(after[name][key] == row for key, row in rows.items()), name
    # Studies kept arriving while the backup ran, before and after its snapshot.
    assert len(after["studies"]) > len(restored["studies"]) > len(before["studies"]) >= 6
    for name in (
        "analysis_results",
        "findings",
        "outputs",
        "deliveries",
        "job_claims",
        "audit_events",
        "api_tokens",
        "events",
    ):
        assert restored[name], f"no {name} in the backup"


def _assert_files_restored(
    restored: dict[str, Any],
    manifest: dict[str, Any],
    source_root: Path,
    target_root: Path,
    models_dir: Path,
    target_models: Path,
) -> None:
    """Every file a restored row names is there, byte for byte; so are the models."""
    files = _referenced_files(restored)
    assert not manifest["missing_files"]
    for relative in files:
        assert _sha256(target_root / relative) == _sha256(source_root / relative), relative
    for output in restored["outputs"].values():
        assert _sha256(target_root / output["path"]) == output["sha256"]
    model_files = {p.relative_to(models_dir) for p in models_dir.rglob("*") if p.is_file()}
    assert manifest["files"]["count"] == len(files) + len(model_files)
    assert {
        p.relative_to(target_models) for p in target_models.rglob("*") if p.is_file()
    } == model_files


def _assert_restored_node_serves(
    settings: Settings, study_instance_uid: str, token: str, restored: dict[str, Any]
) -> None:
    """The restored node starts, answers C-ECHO, and its API serves the study and an output
    to the API token made before the backup."""
    node = start_node(settings, ("scp", "web"), port=0, web_port=0, metrics_port=0)
    try:
        assert echo(node.scp_port) == 0
        headers = {"Authorization": f"Bearer {token}"}
        body = httpx.get(
            f"{node.web_url}/api/v1/studies/{study_instance_uid}", headers=headers, timeout=30
        ).json()
        assert body["study"]["study_instance_uid"] == study_instance_uid and body["outputs"]
        download = httpx.get(
            node.web_url + body["outputs"][0]["download_url"], headers=headers, timeout=30
        )
        row = restored["outputs"][(body["outputs"][0]["sop_instance_uid"],)]
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == row["sha256"]
    finally:
        node.stop()


@pytest.fixture
def source(node_factory: Any) -> Settings:
    """A stopped node that received two studies: rows, events and stored files."""
    node = node_factory()
    for seed in (1, 2):
        ds = make_cxr_dataset(rows=128, columns=112, patient_id=f"S-{seed}", seed=seed)
        assert send_datasets(node.scp_port, [ds]) == [0]
    node.stop()
    return node.settings


def _target(request: pytest.FixtureRequest, source: Settings, folder: Path) -> Settings:
    url = _fresh_database(request, source.database_url, folder)
    return make_settings(folder / "target", url, folder / "target-models")


def test_restore_of_a_fresh_backup_gives_the_same_rows_and_files(
    source: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    backup = tmp_path / "backup"
    summary = create_backup(source, backup, now=utcnow())
    assert summary.tables["instances"] == 2 and summary.file_count >= 2
    target = _target(request, source, tmp_path)
    restore_backup(target, backup)
    assert _without_restore_audit(_rows(target.database_url)) == _rows(source.database_url)
    for relative in _referenced_files(_rows(source.database_url)):
        assert _sha256(Path(target.storage.root) / relative) == _sha256(
            Path(source.storage.root) / relative
        )
    assert (target.models_dir / "registry.json").is_file()


def test_backup_folder_and_database_dump_are_readable_by_their_owner_only(
    source: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    backup = tmp_path / "backup"
    old_umask = os.umask(0o022)  # as a cron job's: would leave the dump world-readable
    try:
        summary = create_backup(source, backup, now=utcnow())
        target = _target(request, source, tmp_path)
        restore_backup(target, backup)
    finally:
        os.umask(old_umask)
    assert backup.stat().st_mode & 0o777 == 0o700
    dump = backup / read_manifest(backup).database_file
    assert dump.stat().st_mode & 0o077 == 0, oct(dump.stat().st_mode)
    if target.database_url.startswith("sqlite"):
        restored = Path(target.database_url.removeprefix("sqlite:///"))
        assert restored.stat().st_mode & 0o007 == 0, oct(restored.stat().st_mode)
    assert summary.file_count >= 2


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_restore_run_as_root_gives_the_files_to_the_storage_roots_owner(
    source: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    backup = tmp_path / "backup"
    create_backup(source, backup, now=utcnow())
    sqlite = source.database_url.startswith("sqlite")  # SQLite: the embedded file in the root
    url = "" if sqlite else _fresh_database(request, source.database_url, tmp_path)
    target = make_settings(tmp_path / "target", url, tmp_path / "target" / "models")
    Path(target.storage.root).mkdir()
    os.chown(target.storage.root, 65534, 65534)  # the node's user owns its storage root
    restore_backup(target, backup)
    written = list(Path(target.storage.root).rglob("*"))
    assert len(written) > 5 and (
        not sqlite or (Path(target.storage.root) / "dicom-node.db") in written
    )
    assert {(p.stat().st_uid, p.stat().st_gid) for p in written} == {(65534, 65534)}


def test_a_file_gone_before_the_copy_is_listed_as_missing_and_the_rest_restores(
    source: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    gone = sorted(_referenced_files(_rows(source.database_url)))[0]
    (Path(source.storage.root) / gone).unlink()  # as retention does, just before its commit
    backup = tmp_path / "backup"
    assert create_backup(source, backup, now=utcnow(), include_models=False).missing_files == (
        gone,
    )
    assert read_manifest(backup).missing_files == (gone,)
    target = _target(request, source, tmp_path)
    assert restore_backup(target, backup).missing_files == (gone,)
    assert len(_rows(target.database_url)["instances"]) == 2


def test_a_failed_backup_leaves_no_half_written_folder(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "no-node", "", tmp_path / "models")
    backup = tmp_path / "backup"
    with pytest.raises(BackupError, match="no SQLite database at"):
        create_backup(settings, backup, now=utcnow())
    assert not backup.exists()


def test_backup_refuses_a_destination_that_is_not_empty(source: Settings, tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / "old-file").write_text("keep me")
    with pytest.raises(BackupTargetNotEmptyError, match="not empty"):
        create_backup(source, backup, now=utcnow(), include_models=False)
    assert [p.name for p in backup.iterdir()] == ["old-file"]


def test_backup_refuses_a_destination_inside_the_storage_root(source: Settings) -> None:
    with pytest.raises(BackupError, match="inside the storage root"):
        create_backup(source, Path(source.storage.root) / "backup", now=utcnow())


def test_restore_refuses_a_target_with_data_unless_forced(source: Settings, tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    create_backup(source, backup, now=utcnow(), include_models=False)
    with pytest.raises(BackupTargetNotEmptyError, match="--force"):
        restore_backup(source, backup)
    stray = Path(source.storage.root) / "instances" / "1.2.3" / "stray.dcm"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not in the backup")
    rows = _rows(source.database_url)
    restore_backup(source, backup, force=True)
    assert _without_restore_audit(_rows(source.database_url)) == rows
    assert not stray.exists()  # --force replaces the images: no orphan survives


def test_restore_refuses_a_storage_root_that_holds_files(
    source: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    backup = tmp_path / "backup"
    create_backup(source, backup, now=utcnow(), include_models=False)
    target = _target(request, source, tmp_path)
    (Path(target.storage.root) / "outputs").mkdir(parents=True)
    (Path(target.storage.root) / "outputs" / "x.dcm").write_bytes(b"x")
    with pytest.raises(BackupTargetNotEmptyError, match="storage root"):
        restore_backup(target, backup)


def test_a_tampered_file_is_a_checksum_mismatch_and_no_database_is_restored(
    source: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    backup = tmp_path / "backup"
    create_backup(source, backup, now=utcnow(), include_models=False)
    victim = next((backup / "storage" / "instances").rglob("*.dcm"))
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BackupIntegrityError, match="checksum mismatch"):
        verify_backup(backup)
    target = _target(request, source, tmp_path)
    with pytest.raises(BackupIntegrityError, match="checksum mismatch"):
        restore_backup(target, backup)
    engine = make_engine(target.database_url)
    try:
        assert current_revision(engine) is None  # the database was left untouched (empty)
    finally:
        engine.dispose()


def test_a_tampered_database_dump_is_refused_before_anything_is_written(
    source: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    backup = tmp_path / "backup"
    create_backup(source, backup, now=utcnow(), include_models=False)
    dump = backup / read_manifest(backup).database_file
    dump.write_bytes(dump.read_bytes() + b"\x00")
    target = _target(request, source, tmp_path)
    with pytest.raises(BackupIntegrityError, match="checksum mismatch"):
        restore_backup(target, backup)
    assert not (Path(target.storage.root) / "instances").exists()


def test_a_backup_without_manifest_or_with_a_damaged_one_is_refused(
    source: Settings, tmp_path: Path
) -> None:
    backup = tmp_path / "backup"
    create_backup(source, backup, now=utcnow(), include_models=False)
    manifest = backup / "manifest.json"
    text_before = manifest.read_text()
    manifest.write_text(text_before[:40])
    with pytest.raises(BackupIntegrityError, match="damaged"):
        restore_backup(source, backup, force=True)
    manifest.unlink()
    with pytest.raises(BackupIntegrityError, match="did not finish"):
        restore_backup(source, backup, force=True)
    with pytest.raises(BackupIntegrityError, match="no backup folder"):
        read_manifest(tmp_path / "nowhere")


def test_a_backup_from_a_newer_schema_is_refused_with_upgrade_first(
    source: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    engine = make_engine(source.database_url)
    try:  # what a newer release leaves: a revision this one does not know
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    backup = tmp_path / "backup"
    assert (
        create_backup(source, backup, now=utcnow(), include_models=False).schema_revision == "9999"
    )
    target = _target(request, source, tmp_path)
    with pytest.raises(BackupSchemaError, match="upgrade the node .* first"):
        restore_backup(target, backup)
    assert not (Path(target.storage.root) / "instances").exists()


def test_a_backup_from_the_previous_schema_is_restored_and_upgraded_to_head(
    source: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from dicom_node.db.migrate import downgrade
    from tests.test_migrations import previous_head

    engine = make_engine(source.database_url)
    try:
        downgrade(engine, previous_head())
        head = head_revision(engine)
    finally:
        engine.dispose()
    backup = tmp_path / "backup"
    assert (
        create_backup(source, backup, now=utcnow(), include_models=False).schema_revision
        == previous_head()
    )
    target = _target(request, source, tmp_path)
    engine = make_engine(target.database_url)
    try:  # a fresh install of this release that has already run `db upgrade`
        upgrade(engine)
    finally:
        engine.dispose()
    restore_backup(target, backup)
    engine = make_engine(target.database_url)
    try:
        assert current_revision(engine) == head
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM instances")).scalar() == 2
    finally:
        engine.dispose()


def test_restore_refuses_a_backup_of_the_other_database_kind(
    source: Settings, tmp_path: Path, postgres_server: str
) -> None:
    backup = tmp_path / "backup"
    create_backup(source, backup, now=utcnow(), include_models=False)
    other = (
        "sqlite:///" + str(tmp_path / "other.db")
        if source.database_url.startswith("postgres")
        else f"{postgres_server}/unused"
    )
    target = make_settings(tmp_path / "other", other, tmp_path / "m")
    with pytest.raises(BackupError, match="restore into a"):
        restore_backup(target, backup)


def test_missing_pg_dump_names_the_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="pg_dump not found.*postgresql-client"):
        find_pg_tool("pg_dump", str(tmp_path), tmp_path)
    assert find_pg_tool("pg_dump", "", Path("/usr/lib/postgresql")).endswith("/bin/pg_dump")


def test_postgres_credentials_go_to_the_environment_not_the_command_line() -> None:
    environment = libpq_environment(
        "postgresql+psycopg://node:s3cret%40x@db.example:5433/dicom?sslmode=require"
    )
    assert environment == {
        "PGUSER": "node",
        "PGPASSWORD": "s3cret@x",
        "PGHOST": "db.example",
        "PGPORT": "5433",
        "PGDATABASE": "dicom",
        "PGSSLMODE": "require",
    }
    with pytest.raises(BackupError, match="'frobnicate'"):
        libpq_environment("postgresql+psycopg://node@db/dicom?frobnicate=1")


@pytest.fixture
def sqlite_source(tmp_path: Path, models_dir: Path) -> Iterator[Path]:
    """A config file of a node with an embedded SQLite database and one received study."""
    root = tmp_path / "store"
    settings = make_settings(root, "", models_dir)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    node = start_node(settings, ("scp",), port=0, metrics_port=0)
    try:
        assert send_datasets(node.scp_port, [make_cxr_dataset(rows=128, columns=112)]) == [0]
    finally:
        node.stop()
    yield write_config(
        tmp_path / "node.toml", root=root, db_url="", port=free_port(), models_dir=models_dir
    )


def _one_line_error(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def test_cli_exit_codes_for_not_empty_damaged_and_newer_backups(
    sqlite_source: Path, tmp_path: Path
) -> None:
    backup = tmp_path / "backup"
    created = run_cli(sqlite_source, "backup", "create", "--no-models", str(backup))
    assert created.returncode == 0, created.stderr[-2000:]
    assert "backup written to" in created.stdout
    again = run_cli(sqlite_source, "backup", "create", str(backup))
    assert again.returncode == 3 and "not empty" in _one_line_error(again)

    target = write_config(
        tmp_path / "target.toml",
        root=tmp_path / "target",
        db_url="",
        port=free_port(),
        models_dir=tmp_path / "target-models",
    )
    victim = next((backup / "storage").rglob("*.dcm"))
    original = victim.read_bytes()
    victim.write_bytes(b"tampered")
    damaged = run_cli(target, "backup", "restore", str(backup))
    assert damaged.returncode == 4 and "checksum mismatch" in _one_line_error(damaged)
    victim.write_bytes(original)

    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["schema_revision"] = "9999"
    (backup / "manifest.json").write_text(json.dumps(manifest))
    newer = run_cli(target, "backup", "restore", "--force", str(backup))
    assert newer.returncode == 5 and "upgrade the node" in _one_line_error(newer)

    shutil.rmtree(backup)
    missing = run_cli(target, "backup", "restore", str(backup))
    assert missing.returncode == 4 and "no backup folder" in _one_line_error(missing)
