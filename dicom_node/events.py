"""Append rows to the events table: the node's durable record of what happened to what.

Events name UIDs, job ids and reasons; never patient data.  Rows are never updated or
deleted (the migration's triggers refuse it).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from dicom_node.db.models import Event


def record_event(
    session: Session,
    name: str,
    *,
    now: datetime,
    level: str = "info",
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    job_id: int | None = None,
    **detail: Any,
) -> None:
    """Add one event row to ``session`` (committed with the caller's transaction)."""
    session.add(
        Event(
            created_at=now,
            name=name,
            level=level,
            study_instance_uid=study_instance_uid,
            sop_instance_uid=sop_instance_uid,
            job_id=job_id,
            detail=event_detail(**detail),
        )
    )


def event_detail(**detail: Any) -> str | None:
    """The ``detail`` column of an event: its details as sorted JSON (None: no details)."""
    return json.dumps(detail, sort_keys=True, default=str) if detail else None
