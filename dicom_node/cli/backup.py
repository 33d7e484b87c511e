"""``dicom-node backup ...``: take, check and restore a backup of the node.

``create`` runs while the node works (the database is snapshotted online); ``restore`` wants the
node stopped and an empty database and storage root (``--force`` replaces what they hold).
Exit codes, for scripts and timers: 0 done, 1 an error (tool missing, database or disk),
3 the destination or target is not empty, 4 the backup is damaged (manifest or checksum),
5 the backup needs a newer release.  Each is one line on standard error.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import structlog
from sqlalchemy import Engine

from dicom_node.audit.trail import record_audit
from dicom_node.ops.backup.archive import BackupSummary, create_backup, restore_backup, verify_backup
from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db import migrate
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.errors import (BackupError, BackupIntegrityError, BackupSchemaError,
                               BackupTargetNotEmptyError)

log = structlog.get_logger(__name__)

EXIT_NOT_EMPTY, EXIT_DAMAGED, EXIT_NEWER = 3, 4, 5


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``backup`` subcommands."""
    backup = commands.add_parser("backup", help="back up and restore the database, images, "
                                 "results and models")
    backup_commands = backup.add_subparsers(dest="backup_command", required=True)
    create = backup_commands.add_parser("create", help=(
        "write a backup into DEST_DIR (new or empty), while the node runs"))
    create.add_argument("destination", metavar="DEST_DIR")
    create.add_argument("--no-models", action="store_true", help=(
        "leave out the installed model weights (default: included; they may not be "
        "downloadable on site)"))
    restore = backup_commands.add_parser("restore", help=(
        "restore SRC_DIR into this node's database and storage root (stop the node first)"))
    restore.add_argument("source", metavar="SRC_DIR")
    restore.add_argument("--force", action="store_true", help=(
        "replace a database and storage root that already hold data (what they hold is lost)"))
    verify = backup_commands.add_parser("verify", help="re-check every file of a backup "
                                        "against its SHA-256")
    verify.add_argument("source", metavar="SRC_DIR")


def exit_code(error: BackupError) -> int:
    """The exit code of a backup error (see the module docstring)."""
    if isinstance(error, BackupTargetNotEmptyError):
        return EXIT_NOT_EMPTY
    if isinstance(error, BackupIntegrityError):
        return EXIT_DAMAGED
    if isinstance(error, BackupSchemaError):
        return EXIT_NEWER
    return 1


def run_backup_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run one ``backup`` subcommand; returns the exit code (errors raise BackupError)."""
    if args.backup_command == "verify":
        manifest = verify_backup(Path(args.source))
        print(f"backup {args.source} is intact: {manifest.file_count} files and the "
              f"{manifest.kind} database match their SHA-256 (made {manifest.created_at} by "
              f"dicom-node {manifest.node_version}, schema {manifest.schema_revision})")
        return 0
    if args.backup_command == "create":
        summary = create_backup(settings, Path(args.destination), now=utcnow(),
                                include_models=not args.no_models)
        _audit(settings, "backup.created", summary)
        print(f"backup written to {summary.folder}: {summary.kind} database at schema "
              f"{summary.schema_revision}, {_rows(summary)}, {summary.file_count} files "
              f"({summary.file_bytes / 1e6:.1f} MB)")
    else:
        summary = restore_backup(settings, Path(args.source), force=args.force)
        _audit(settings, "backup.restored", summary)
        print(f"restored {summary.folder}: {_rows(summary)}, {summary.file_count} files; "
              f"database at schema {_current(settings)}"
              f"{'' if summary.models_restored else '; installed models kept (not replaced)'}")
    if summary.missing_files:
        print(f"warning: {len(summary.missing_files)} files the database names were already "
              "gone when the backup was taken (purged or lost); manifest.json lists them")
    return 0


def _rows(summary: BackupSummary) -> str:
    studies = summary.tables.get("studies", 0)
    return f"{studies} studies, {sum(summary.tables.values())} rows"


def _current(settings: Settings) -> str:
    with _engine(settings) as engine:
        return migrate.current_revision(engine) or "base"


def _audit(settings: Settings, event_type: str, summary: BackupSummary) -> None:
    """One audit row and log line for the backup or restore, when the schema has the table."""
    log.info(event_type, folder=str(summary.folder),
             files=summary.file_count, schema_revision=summary.schema_revision)
    with _engine(settings) as engine:
        if migrate.current_revision(engine) != migrate.head_revision(engine):
            return  # an older or newer schema: this release's audit table may differ
        with session_scope(make_session_factory(engine)) as session:
            record_audit(session, event_type=event_type, now=utcnow(), username="cli",
                         folder=str(summary.folder), files=summary.file_count,
                         schema_revision=summary.schema_revision)


@contextlib.contextmanager
def _engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url, settings.database.busy_timeout_ms)
    try:
        yield engine
    finally:
        engine.dispose()
