"""The audit trail: an append-only, access-controlled record of who saw or did what, and when.

Every view of a study, every download, every log-in (success and failure), every feedback and
every administrative action is one ``audit_events`` row, written in the caller's transaction.
A row may name the study (``study_instance_uid``) and the patient's ID (needed to answer "who
looked at this patient's images?"), but NEVER the patient's name; the details are JSON of
non-identifying values.  The migration's triggers refuse UPDATE and DELETE.  A later operations
issue extends this module (ATNA-style events, export); the API here stays small on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.db.models import AuditEvent
from dicom_node.logs import PHI_KEYS

SUCCESS = "success"
FAILURE = "failure"


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


def record_audit(session: Session, *, event_type: str, now: datetime, outcome: str = SUCCESS,
                 username: str | None = None, study_instance_uid: str | None = None,
                 patient_id: str | None = None, **details: Any) -> None:
    """Add one audit row to ``session`` (committed with the caller's transaction).

    Detail keys that name patient data (``patient_name`` and the like) are dropped, so a
    careless caller cannot put a name into the trail.
    """
    if outcome not in (SUCCESS, FAILURE):
        raise ValueError(f"audit outcome must be {SUCCESS!r} or {FAILURE!r}, not {outcome!r}")
    kept = {key: value for key, value in details.items()
            if key not in PHI_KEYS and key.lower() not in PHI_KEYS}
    session.add(AuditEvent(
        created_at=now, event_type=event_type, username=username, outcome=outcome,
        study_instance_uid=study_instance_uid, patient_id=patient_id,
        details=json.dumps(kept, sort_keys=True, default=str) if kept else None))


def list_audit(session: Session, *, limit: int = 100, event_type: str | None = None,
               study_instance_uid: str | None = None) -> list[AuditRecord]:
    """The newest ``limit`` audit events, optionally of one type or one study."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if event_type is not None:
        query = query.where(AuditEvent.event_type == event_type)
    if study_instance_uid is not None:
        query = query.where(AuditEvent.study_instance_uid == study_instance_uid)
    return [AuditRecord(row.created_at, row.event_type, row.username, row.outcome,
                        row.study_instance_uid, row.patient_id,
                        json.loads(row.details) if row.details else {})
            for row in session.scalars(query)]
