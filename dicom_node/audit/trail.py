"""The audit trail: an append-only, access-controlled record of who saw or did what, and when.

Every view of a study, every download, every log-in (success and failure), every feedback,
every administrative action, and the IHE ATNA-style events of the node itself (application
start and stop, DICOM instances transferred in and out, security alerts) is one
``audit_events`` row.  A row may name the study (``study_instance_uid``) and the patient's ID
(ATNA's "DICOM Instances Transferred" and "Patient Record" events identify the patient by ID),
but NEVER the patient's name; the details are JSON of non-identifying values.  The
migration's triggers refuse UPDATE and DELETE, and the node never purges the table.

This module is the store: writing and reading rows.  The JSON lines export lives in
:mod:`dicom_node.audit.export`, the RFC 5424 syslog copy in :mod:`dicom_node.audit.syslog`.
A row written after the fact (:func:`record_audit_safely`) that the database cannot take
because it is unreachable goes to the spool of :mod:`dicom_node.audit.spool` (fsynced) and is
written when the database answers again.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.spool import append_event, is_outage, spool_of
from dicom_node.clock import as_utc
from dicom_node.db.models import AuditEvent
from dicom_node.db.session import session_scope
from dicom_node.logs import PHI_KEYS

log = structlog.get_logger(__name__)

SUCCESS = "success"
FAILURE = "failure"

# The node's own ATNA-style event types (IHE ITI TF-2a 3.20.6 / DICOM PS3.15 A.5.3).
APPLICATION_STARTED = "application.started"  # Application Activity, started
APPLICATION_STOPPED = "application.stopped"  # Application Activity, stopped
INSTANCES_RECEIVED = "instances.received"  # DICOM Instances Transferred, in
INSTANCES_SENT = "instances.sent"  # DICOM Instances Transferred, out
SECURITY_ALERT = "security.alert"  # Security Alert (details: reason)


@dataclass(frozen=True)
class AuditRecord:
    """One audit event as read back (the row, detached from the session)."""

    created_at: datetime
    event_type: str
    username: str | None
    outcome: str
    study_instance_uid: str | None
    patient_id: str | None
    details: dict[str, Any]
    id: int | None = None


def audit_values(
    *,
    event_type: str,
    now: datetime,
    outcome: str = SUCCESS,
    username: str | None = None,
    study_instance_uid: str | None = None,
    patient_id: str | None = None,
    event_uuid: str | None = None,
    **details: Any,
) -> dict[str, Any]:
    """The column values of one audit row (what :func:`record_audit` adds, or a spool line).

    Detail keys that name patient data (``patient_name`` and the like) are dropped, so a
    careless caller cannot put a name into the trail.
    """
    if outcome not in (SUCCESS, FAILURE):
        raise ValueError(f"audit outcome must be {SUCCESS!r} or {FAILURE!r}, not {outcome!r}")
    kept = {
        key: value
        for key, value in details.items()
        if key not in PHI_KEYS and key.lower() not in PHI_KEYS
    }
    return {
        "event_uuid": event_uuid,
        "created_at": now,
        "event_type": event_type,
        "username": username,
        "outcome": outcome,
        "study_instance_uid": study_instance_uid,
        "patient_id": patient_id,
        "details": json.dumps(kept, sort_keys=True, default=str) if kept else None,
    }


def record_audit(
    session: Session,
    *,
    event_type: str,
    now: datetime,
    outcome: str = SUCCESS,
    username: str | None = None,
    study_instance_uid: str | None = None,
    patient_id: str | None = None,
    **details: Any,
) -> None:
    """Add one audit row to ``session`` (committed with the caller's transaction).

    Detail keys that name patient data (``patient_name`` and the like) are dropped.
    """
    session.add(
        AuditEvent(
            **audit_values(
                event_type=event_type,
                now=now,
                outcome=outcome,
                username=username,
                study_instance_uid=study_instance_uid,
                patient_id=patient_id,
                **details,
            )
        )
    )


def record_audit_safely(
    factory: sessionmaker[Session], *, event_type: str, now: datetime, **fields: Any
) -> bool:
    """Write one audit row in its own transaction; False (logged, no PHI) if it was lost.

    For callers whose own outcome must not depend on the trail: the SCP after a C-STORE
    response, start-up and shut-down, delivery after the ledger is written.  When the
    database is unreachable and the factory has a spool (:func:`dicom_node.audit.spool.
    attach_spool`), the row is appended there, fsynced, and True is returned: it is written,
    with its original time and once only (its ``event_uuid``), when the database answers.
    """
    values = audit_values(event_type=event_type, now=now, event_uuid=uuid.uuid4().hex, **fields)
    try:
        with session_scope(factory) as session:
            session.add(AuditEvent(**values))
        return True
    except SQLAlchemyError as exc:
        spool = spool_of(factory)
        if spool is None or not is_outage(exc):
            log.error("audit.not_recorded", event_type=event_type, error_type=type(exc).__name__)
            return False
        error_type = type(exc).__name__
    try:
        append_event(spool, values)
    except OSError as exc:
        log.error(
            "audit.not_recorded",
            event_type=event_type,
            error_type=error_type,
            spool_error=exc.strerror or type(exc).__name__,
        )
        return False
    log.warning(
        "audit.spooled",
        event_type=event_type,
        error_type=error_type,
        event_uuid=values["event_uuid"],
    )
    return True


def as_record(row: AuditEvent) -> AuditRecord:
    """The row's values as a detached record (details parsed from JSON)."""
    return AuditRecord(
        as_utc(row.created_at),
        row.event_type,
        row.username,
        row.outcome,
        row.study_instance_uid,
        row.patient_id,
        json.loads(row.details) if row.details else {},
        row.id,
    )


def list_audit(
    session: Session,
    *,
    limit: int = 100,
    event_type: str | None = None,
    study_instance_uid: str | None = None,
) -> list[AuditRecord]:
    """The newest ``limit`` audit events, optionally of one type or one study."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if event_type is not None:
        query = query.where(AuditEvent.event_type == event_type)
    if study_instance_uid is not None:
        query = query.where(AuditEvent.study_instance_uid == study_instance_uid)
    return [as_record(row) for row in session.scalars(query)]


def read_audit(
    session: Session,
    *,
    after_id: int = 0,
    limit: int = 1000,
    since: datetime | None = None,
    until: datetime | None = None,
    event_type: str | None = None,
) -> list[AuditRecord]:
    """Up to ``limit`` events with an id above ``after_id`` in ``[since, until)``, optionally of
    one type, oldest first: one page of an export (page on with the last record's id)."""
    query = select(AuditEvent).where(AuditEvent.id > after_id).order_by(AuditEvent.id).limit(limit)
    if since is not None:
        query = query.where(AuditEvent.created_at >= since)
    if until is not None:
        query = query.where(AuditEvent.created_at < until)
    if event_type is not None:
        query = query.where(AuditEvent.event_type == event_type)
    return [as_record(row) for row in session.scalars(query)]
