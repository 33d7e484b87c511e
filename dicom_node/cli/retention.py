"""``dicom-node retention run [--dry-run]``: purge received images now, or count what would go.

The same purge the worker role runs every ``[retention] interval_minutes``
(``dicom_node.ops.retention``); this command is for a first run after enabling retention, for
checking the rule with ``--dry-run``, and for cron-driven sites.  Exit 0 when every eligible
file is gone, 1 when some could not be removed (they are retried on the next run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.cli.db import command_engine
from dicom_node.cli.exits import ExitStatus
from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.session import make_session_factory
from dicom_node.ops.retention import RetentionReport, run_retention


def run_retention_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Run one ``retention`` subcommand against the migrated database."""
    with command_engine(settings) as engine:
        days = settings.retention.images_days
        if days <= 0:
            print("retention is off ([retention] images_days = 0): images are kept, nothing purged")
            return ExitStatus.OK
        report = run_retention(
            make_session_factory(engine),
            Path(settings.storage.root),
            images_days=days,
            now=utcnow(),
            dry_run=args.dry_run,
        )
    print(summary(report, days))
    if report.failed:
        print(
            f"error: {report.failed} file(s) could not be removed; see the log "
            "(retention.remove_failed); they are tried again on the next run"
        )
        return ExitStatus.FAILURE
    return ExitStatus.OK


def summary(report: RetentionReport, days: int) -> str:
    """The lines the command prints: counts, bytes freed, and the cutoff applied."""
    verb = "would purge" if report.dry_run else "purged"
    lines = [
        f"retention: images of studies delivered before {report.cutoff:%Y-%m-%d %H:%M} UTC "
        f"({days} day(s) ago)",
        f"{verb} {report.removed} file(s) of {len(report.studies)} study(ies), "
        f"{_size(report.bytes_freed)} {'to free' if report.dry_run else 'freed'}",
    ]
    if report.missing:
        lines.append(
            f"{report.missing} file(s) were already missing"
            f"{'' if report.dry_run else ' (recorded as purged)'}"
        )
    if report.dry_run:
        lines.append("dry run: nothing was removed")
    return "\n".join(lines)


def _size(count: int) -> str:
    return f"{count} bytes ({count / (1024 * 1024):.1f} MiB)"
