"""The worklist on a database seeded through the ORM: the idle timeout with the page's
self-refresh, date limits, SQL-side filters and priority beyond the page limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dicom_node.db.models import AuditEvent
from tests.web_db import T0, add_study, log_in, web_db


def _views(db: Any) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.event_type == "worklist.viewed")))


def test_worklist_auto_refresh_does_not_keep_an_idle_session_alive(
        engine: Any, tmp_path: Path) -> None:
    db = web_db(engine, tmp_path, session_idle_minutes=1, refresh_seconds=30)
    log_in(db.client)
    page = db.client.get("/worklist", params={"status": "done"})
    assert page.status_code == 200
    assert 'content="30;url=/worklist?status=done&amp;auto=1"' in page.text
    views = _views(db)
    for seconds in (30, 30):  # the page reloading itself, nobody at the screen
        db.clock.advance(seconds=seconds)
        assert db.client.get("/worklist", params={"status": "done", "auto": "1"}).status_code == 200
    assert _views(db) == views  # the self-refresh is not an audited view
    db.clock.advance(seconds=5)  # 65 s since the last real request
    response = db.client.get("/worklist")
    assert response.status_code == 303 and response.headers["location"].startswith("/login")


def test_dates_outside_1900_to_2100_get_422_on_the_page_and_the_api(
        engine: Any, tmp_path: Path) -> None:
    db = web_db(engine, tmp_path)
    log_in(db.client)
    for params in ({"date_to": "9999-12-31"}, {"date_from": "0001-01-01"},
                   {"date_from": "1899-12-31"}, {"date_to": "2101-01-01"}):
        for path in ("/worklist", "/api/v1/worklist"):
            response = db.client.get(path, params=params)
            assert response.status_code == 422, (path, params, response.status_code)
            assert "between 1900-01-01 and 2100-12-31" in response.text
    for path in ("/worklist", "/api/v1/worklist"):
        assert db.client.get(path, params={"date_from": "1900-01-01",
                                           "date_to": "2100-12-31"}).status_code == 200
