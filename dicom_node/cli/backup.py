"""``dicom-node backup ...``: take, check and restore a backup of the node.

``create`` runs while the node works (the database is snapshotted online); ``restore`` wants the
node stopped and an empty database and storage root (``--force`` replaces what they hold).
Exit codes, for scripts and timers: 0 done, 1 an error (tool missing, database or disk),
3 the destination or target is not empty, 4 the backup is damaged (manifest or checksum),
5 the backup needs a newer release (decided by ``dicom_node.cli.main.EXIT_CODE``).  Each is
one line on standard error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import structlog

from dicom_node.audit.trail import record_audit
from dicom_node.cli.db import command_engine
from dicom_node.cli.exits import ExitStatus
from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db import migrate
from dicom_node.db.session import make_session_factory, session_scope
from dicom_node.ops.backup.archive import (
    BackupSummary,
    create_backup,
    restore_backup,
    verify_backup,
)

log = structlog.get_logger(__name__)


def run_backup_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Run one ``backup`` subcommand; returns the exit code (errors raise BackupError)."""
    if args.backup_command == "verify":
        manifest = verify_backup(Path(args.source))
        print(
            f"backup {args.source} is intact: {manifest.file_count} files and the "
            f"{manifest.kind} database match their SHA-256 (made {manifest.created_at} by "
            f"dicom-node {manifest.node_version}, schema {manifest.schema_revision})"
        )
        return ExitStatus.OK
    if args.backup_command == "create":
        summary = create_backup(
            settings, Path(args.destination), now=utcnow(), include_models=not args.no_models
        )
        _audit(settings, "backup.created", summary)
        print(
            f"backup written to {summary.folder}: {summary.kind} database at schema "
            f"{summary.schema_revision}, {_rows(summary)}, {summary.file_count} files "
            f"({summary.file_bytes / 1e6:.1f} MB)"
        )
    else:
        summary = restore_backup(settings, Path(args.source), force=args.force)
        _audit(settings, "backup.restored", summary)
        print(
            f"restored {summary.folder}: {_rows(summary)}, {summary.file_count} files; "
            f"database at schema {_current(settings)}"
            f"{'' if summary.models_restored else '; installed models kept (not replaced)'}"
        )
    if summary.missing_files:
        print(
            f"warning: {len(summary.missing_files)} files the database names were already "
            "gone when the backup was taken (purged or lost); manifest.json lists them"
        )
    return ExitStatus.OK


def _rows(summary: BackupSummary) -> str:
    studies = summary.tables.get("studies", 0)
    return f"{studies} studies, {sum(summary.tables.values())} rows"


def _current(settings: Settings) -> str:
    with command_engine(settings, migrated=False) as engine:
        return migrate.current_revision(engine) or "base"


def _audit(settings: Settings, event_type: str, summary: BackupSummary) -> None:
    """One audit row and log line for the backup or restore, when the schema has the table."""
    log.info(
        event_type,
        folder=str(summary.folder),
        files=summary.file_count,
        schema_revision=summary.schema_revision,
    )
    with command_engine(settings, migrated=False) as engine:
        if migrate.current_revision(engine) != migrate.head_revision(engine):
            return  # an older or newer schema: this release's audit table may differ
        with session_scope(make_session_factory(engine)) as session:
            record_audit(
                session,
                event_type=event_type,
                now=utcnow(),
                username="cli",
                folder=str(summary.folder),
                files=summary.file_count,
                schema_revision=summary.schema_revision,
            )
