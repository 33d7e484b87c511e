"""The audit trail: append-only rows, no patient names, readable back in order."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from dicom_node.audit.trail import list_audit, record_audit
from dicom_node.clock import utcnow
from dicom_node.db.session import make_session_factory, session_scope


def test_audit_events_are_append_only_and_never_hold_a_patient_name(engine: Engine) -> None:
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        record_audit(
            session,
            event_type="study.viewed",
            now=utcnow(),
            username="rad",
            study_instance_uid="1.2.3",
            patient_id="P-1",
            patient_name="CANARY^PHI",
            PatientName="CANARY^PHI",
            via="page",
        )
        record_audit(
            session, event_type="user.login", now=utcnow(), outcome="failure", username="mallory"
        )
    with session_scope(factory) as session:
        events = list_audit(session)
    assert [e.event_type for e in events] == ["user.login", "study.viewed"]
    assert events[1].details == {"via": "page"} and events[1].patient_id == "P-1"
    assert events[0].outcome == "failure"
    with engine.connect() as connection:
        dump = " ".join(str(row) for row in connection.execute(text("SELECT * FROM audit_events")))
    assert "CANARY" not in dump
    for statement in ("UPDATE audit_events SET username = 'x'", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="append-only"):
            with engine.begin() as connection:
                connection.execute(text(statement))


def test_record_audit_refuses_an_outcome_it_does_not_know(engine: Engine) -> None:
    with session_scope(make_session_factory(engine)) as session:
        with pytest.raises(ValueError, match="outcome"):
            record_audit(session, event_type="x", now=utcnow(), outcome="maybe")
