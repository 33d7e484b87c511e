"""The audit trail as JSON lines: one event per line, stable keys, UTC ISO 8601 times.

The same line is the MSG of the RFC 5424 syslog copy (:mod:`dicom_node.audit.syslog`), so a
site's audit repository and an exported file read alike.  Keys, always all present:
``id``, ``time``, ``event_type``, ``outcome``, ``username``, ``study_instance_uid``,
``patient_id``, ``details`` (an object).  Patient names are never in the trail to begin with.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, TextIO

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.trail import AuditRecord, read_audit
from dicom_node.clock import as_utc
from dicom_node.db.session import session_scope


def format_time(value: datetime) -> str:
    """UTC, microseconds, ``Z``: the RFC 3339 form RFC 5424's TIMESTAMP also takes."""
    text = as_utc(value).astimezone(UTC).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or date-time; one without an offset is taken as UTC.

    Raises ValueError with a one-line message for anything else.
    """
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"not an ISO 8601 date or time: {text!r} (e.g. 2026-12-01 or 2026-12-01T08:00:00Z)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def event_as_dict(record: AuditRecord) -> dict[str, Any]:
    """The exported form of one event."""
    return {
        "id": record.id,
        "time": format_time(record.created_at),
        "event_type": record.event_type,
        "outcome": record.outcome,
        "username": record.username,
        "study_instance_uid": record.study_instance_uid,
        "patient_id": record.patient_id,
        "details": record.details,
    }


def json_line(record: AuditRecord) -> str:
    """One event as one line of ASCII JSON (no newline), keys sorted."""
    return json.dumps(
        event_as_dict(record), sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str
    )


def export_events(
    factory: sessionmaker[Session],
    out: TextIO,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    event_type: str | None = None,
    page: int = 1000,
) -> int:
    """Write the matching events to ``out``, oldest first; returns how many.

    Each page is read in its own short transaction: on SQLite every transaction takes the
    write lock, and a long export must not make the SCP's commits wait.
    """
    count, after_id = 0, 0
    while True:
        with session_scope(factory) as session:
            records = read_audit(
                session,
                after_id=after_id,
                limit=page,
                since=since,
                until=until,
                event_type=event_type,
            )
        for record in records:
            out.write(json_line(record) + "\n")
        count += len(records)
        if len(records) < page:
            return count
        after_id = records[-1].id or after_id
