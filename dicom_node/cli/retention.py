"""``dicom-node retention run [--dry-run]``: purge received images now, or count what would go.

The same purge the worker role runs every ``[retention] interval_minutes``
(``dicom_node.ops.retention``); this command is for a first run after enabling retention, for
checking the rule with ``--dry-run``, and for cron-driven sites.  Exit 0 when every eligible
file is gone, 1 when some could not be removed (they are retried on the next run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sqlalchemy import Engine

from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.session import make_session_factory
from dicom_node.ops.retention import RetentionReport, run_retention


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``retention`` subcommands."""
    retention = commands.add_parser("retention", help="purge received images after delivery")
    run = retention.add_subparsers(dest="retention_command", required=True).add_parser(
        "run", help="purge the images that [retention] images_days makes eligible, now")
    run.add_argument("--dry-run", action="store_true",
                     help="only count what would be purged; remove nothing")


def run_retention_command(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    """Run one ``retention`` subcommand against a migrated database; returns the exit code."""
    days = settings.retention.images_days
    if days <= 0:
        print("retention is off ([retention] images_days = 0): images are kept, nothing purged")
        return 0
    report = run_retention(make_session_factory(engine), Path(settings.storage.root),
                           images_days=days, now=utcnow(), dry_run=args.dry_run)
    print(summary(report, days))
    if report.failed:
        print(f"error: {report.failed} file(s) could not be removed; see the log "
              "(retention.remove_failed); they are tried again on the next run")
        return 1
    return 0


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
        lines.append(f"{report.missing} file(s) were already missing"
                     f"{'' if report.dry_run else ' (recorded as purged)'}")
    if report.dry_run:
        lines.append("dry run: nothing was removed")
    return "\n".join(lines)


def _size(count: int) -> str:
    return f"{count} bytes ({count / (1024 * 1024):.1f} MiB)"
