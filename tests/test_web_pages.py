"""Pages on a database seeded through the ORM: log-out really ends the session, views are
audited, a new log-in replaces the old session, failed log-ins and heatmap caching."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicom_node.db.models import AuditEvent, WebSession
from dicom_node.web.auth import SESSION_COOKIE
from tests.web_db import T0, add_study, log_in, web_db
from tests.web_support import PASSWORD, csrf_from


def test_a_session_cookie_stops_working_after_log_out(engine: Any, tmp_path: Path) -> None:
    db = web_db(engine, tmp_path)
    log_in(db.client)
    cookie = db.client.cookies[SESSION_COOKIE]
    token = csrf_from(db.client.get("/worklist").text)
    assert db.client.post("/logout", data={"csrf_token": token}).status_code == 303
    with db.session() as session:
        assert session.scalars(select(WebSession)).all() == []
    db.client.cookies.clear()
    db.client.cookies.set(SESSION_COOKIE, cookie)  # a copy of the cookie kept from before
    replay = db.client.get("/worklist")
    assert replay.status_code == 303 and replay.headers["location"].startswith("/login")
    assert db.client.get("/api/v1/worklist").status_code == 401


def test_a_study_view_writes_a_study_viewed_audit_row_with_the_user_and_study(
    engine: Any, tmp_path: Path
) -> None:
    db = web_db(engine, tmp_path)
    with db.session() as session:
        add_study(session, "1.2.5.1", T0, positives=("Pneumothorax",))
    log_in(db.client)
    page = db.client.get("/studies/1.2.5.1")
    assert page.status_code == 200
    assert "open-in-viewer" not in page.text  # no [web] viewer_url: no viewer link
    with db.session() as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "study.viewed")
        ).all()
    assert [(r.username, r.study_instance_uid, r.outcome) for r in rows] == [
        ("rad", "1.2.5.1", "success")
    ]


def test_logging_in_again_ends_the_browsers_previous_session(engine: Any, tmp_path: Path) -> None:
    db = web_db(engine, tmp_path)
    log_in(db.client)
    old = db.client.cookies[SESSION_COOKIE]
    db.client.cookies.clear()
    page = db.client.get("/login")  # the form, with its CSRF cookie
    db.client.cookies.set(SESSION_COOKIE, old)
    response = db.client.post(
        "/login", data={"username": "rad", "password": PASSWORD, "csrf_token": csrf_from(page.text)}
    )
    assert response.status_code == 303
    with db.session() as session:
        assert len(session.scalars(select(WebSession)).all()) == 1
    assert response.cookies[SESSION_COOKIE] != old
    db.client.cookies.clear()
    db.client.cookies.set(SESSION_COOKIE, old)
    assert db.client.get("/worklist").status_code == 303


def test_a_failed_log_in_audits_the_typed_name_only_when_it_is_a_user(
    engine: Any, tmp_path: Path
) -> None:
    db = web_db(engine, tmp_path)
    for typed in ("DOE^JANE", "rad"):
        page = db.client.get("/login")
        failed = db.client.post(
            "/login",
            data={
                "username": typed,
                "password": "wrong password",
                "csrf_token": csrf_from(page.text),
            },
        )
        assert failed.status_code == 401
    with db.session() as session:
        names = session.scalars(
            select(AuditEvent.username)
            .where(AuditEvent.event_type == "user.login")
            .order_by(AuditEvent.id)
        ).all()
    assert names == [None, "rad"]


def test_the_study_page_opens_the_study_in_the_configured_viewer(
    engine: Any, tmp_path: Path
) -> None:
    viewer = "https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_instance_uid}"
    db = web_db(engine, tmp_path, viewer_url=viewer)
    with db.session() as session:
        add_study(session, "1.2.5.9", T0, positives=("Pneumothorax",))
    log_in(db.client)
    page = db.client.get("/studies/1.2.5.9").text
    link = re.search(r'<a id="open-in-viewer" href="([^"]+)"', page)
    assert link is not None
    assert html.unescape(link.group(1)) == viewer.replace("{study_instance_uid}", "1.2.5.9")
