"""``dicom-node audit export``: the audit trail as JSON lines, for an auditor or an archive.

One event per line (keys: id, time, event_type, outcome, username, study_instance_uid,
patient_id, details), oldest first, times in UTC.  ``--since``/``--until`` take ISO 8601
dates or times (no offset: UTC) and select ``since <= time < until``.  A file given with
``--output`` is written whole or not at all (a temporary file renamed into place), readable
by its owner only: the trail holds patient IDs.  The export itself is audited
(``audit.exported``).  Exit 0 on success, 2 for a bad argument, 1 when the file cannot be
written or the database is unavailable; errors are one line on standard error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TextIO

from sqlalchemy import Engine

from dicom_node.audit.export import export_events, parse_time
from dicom_node.audit.trail import record_audit_safely
from dicom_node.cli.db import command_engine
from dicom_node.cli.exits import ExitStatus
from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.session import make_session_factory

_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+")


def _bad(message: str) -> ExitStatus:
    print(f"error: {message}", file=sys.stderr)
    return ExitStatus.USAGE


def _times(args: argparse.Namespace) -> tuple[datetime | None, datetime | None] | str:
    """The parsed ``--since``/``--until``, or a one-line problem."""
    parsed: list[datetime | None] = []
    for option, text in (("--since", args.since), ("--until", args.until)):
        try:
            parsed.append(parse_time(text) if text is not None else None)
        except ValueError as exc:
            return f"{option}: {exc}"
    since, until = parsed
    if since is not None and until is not None and since >= until:
        return "--since must be earlier than --until"
    return since, until


@contextlib.contextmanager
def _destination(path: str | None) -> Iterator[TextIO]:
    """Standard output, or a temporary file beside ``path`` renamed onto it on success."""
    if path is None or path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="ascii", newline="\n") as handle:  # mkstemp: 0600
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def run_audit_export(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Run ``audit export`` against the migrated database."""
    with command_engine(settings) as engine:
        return run_audit_command(engine, args)


def run_audit_command(engine: Engine, args: argparse.Namespace) -> ExitStatus:
    """Run ``audit export`` against a migrated database; returns the exit status."""
    times = _times(args)
    if isinstance(times, str):
        return _bad(times)
    if args.event_type is not None and not _EVENT_TYPE.fullmatch(args.event_type):
        return _bad(f"--type: not an event type: {args.event_type!r} (e.g. study.viewed)")
    since, until = times
    factory = make_session_factory(engine)
    try:
        with _destination(args.output) as out:
            count = export_events(
                factory, out, since=since, until=until, event_type=args.event_type
            )
    except BrokenPipeError:
        raise  # `... | head`: the CLI's main stops quietly
    except OSError as exc:
        print(
            f"error: cannot write {args.output}: {exc.strerror or type(exc).__name__}",
            file=sys.stderr,
        )
        return ExitStatus.FAILURE
    record_audit_safely(
        factory,
        event_type="audit.exported",
        now=utcnow(),
        username="cli",
        events=count,
        since=args.since,
        until=args.until,
        event_filter=args.event_type,
        to_file=args.output is not None,
    )
    where = f" to {args.output}" if args.output not in (None, "-") else ""
    print(f"exported {count} audit event(s){where}", file=sys.stderr)
    return ExitStatus.OK
