"""A web app on a real migrated database, with rows seeded straight through the ORM and a
clock the test moves: fast enough for many studies, no DICOM traffic or model needed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config.settings import WebSettings
from dicom_node.db.models import AnalysisResult, Finding, Job, Study
from dicom_node.db.session import make_session_factory, session_scope
from dicom_node.web.app import build_app
from dicom_node.web.users import add_user
from tests.conftest import make_settings
from tests.web_support import PASSWORD, csrf_from

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class WebDb:
    client: TestClient
    factory: sessionmaker[Session]
    clock: Clock = field(default_factory=Clock)

    def session(self) -> Any:
        return session_scope(self.factory)


def web_db(engine: Any, root: Path, **web: Any) -> WebDb:
    """The app over ``engine`` (already migrated) with a radiologist ``rad``."""
    settings = make_settings(
        root, str(engine.url.render_as_string(hide_password=False)), web=WebSettings(**web)
    )
    factory = make_session_factory(engine)
    clock = Clock()
    with session_scope(factory) as session:
        add_user(session, username="rad", password=PASSWORD, role="radiologist", now=clock())
    client = TestClient(build_app(settings, factory, clock=clock), follow_redirects=False)
    return WebDb(client, factory, clock)


def log_in(client: TestClient, username: str = "rad") -> None:
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"username": username, "password": PASSWORD, "csrf_token": csrf_from(page.text)},
    )
    assert response.status_code == 303, response.text


def add_study(
    session: Session,
    uid: str,
    received_at: datetime,
    *,
    state: str = "done",
    positives: tuple[str, ...] = (),
    negatives: tuple[str, ...] = ("Effusion",),
    reason: str | None = None,
) -> None:
    """A study with one analysis job in ``state``; a done job gets a result and findings."""
    session.add(
        Study(
            study_instance_uid=uid,
            first_received_at=received_at,
            last_received_at=received_at,
            instance_count=1,
            patient_name="DOE^JANE",
            patient_id="PID-" + uid[-4:],
            accession_number=uid[-8:],
        )
    )
    session.flush()
    job = Job(
        kind="analysis",
        state=state,
        study_instance_uid=uid,
        study_revision=1,
        target="",
        attempts=1,
        reason=reason,
        created_at=received_at,
        updated_at=received_at,
    )
    session.add(job)
    session.flush()
    if state != "done":
        return
    session.add(
        AnalysisResult(
            job_id=job.id,
            study_instance_uid=uid,
            sop_instance_uid=uid + ".1",
            model_name="densenet121-res224-all",
            model_version="test",
            weights_sha256="0" * 64,
            weights_status="verified",
            thresholds_source="test",
            created_at=received_at,
        )
    )
    session.flush()
    for label in positives + negatives:
        session.add(
            Finding(
                job_id=job.id,
                label=label,
                positive=label in positives,
                probability=0.9 if label in positives else 0.1,
                threshold=0.5,
                boxes=json.dumps([]),
            )
        )
