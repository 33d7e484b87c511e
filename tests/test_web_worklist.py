"""The worklist on a database seeded through the ORM: the idle timeout with the page's
self-refresh, date limits, SQL-side filters and priority beyond the page limit."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from dicom_node.db.migrate import upgrade
from dicom_node.db.models import AuditEvent
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.web.feedback import add_feedback
from dicom_node.web.queries import WorklistFilter, worklist
from tests.web_db import T0, add_study, log_in, web_db


def _views(db: Any) -> int:
    with db.session() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.event_type == "worklist.viewed")
            )
        )


def test_worklist_auto_refresh_does_not_keep_an_idle_session_alive(
    engine: Any, tmp_path: Path
) -> None:
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
    engine: Any, tmp_path: Path
) -> None:
    db = web_db(engine, tmp_path)
    log_in(db.client)
    for params in (
        {"date_to": "9999-12-31"},
        {"date_from": "0001-01-01"},
        {"date_from": "1899-12-31"},
        {"date_to": "2101-01-01"},
    ):
        for path in ("/worklist", "/api/v1/worklist"):
            response = db.client.get(path, params=params)
            assert response.status_code == 422, (path, params, response.status_code)
            assert "between 1900-01-01 and 2100-12-31" in response.text
    for path in ("/worklist", "/api/v1/worklist"):
        assert (
            db.client.get(
                path, params={"date_from": "1900-01-01", "date_to": "2100-12-31"}
            ).status_code
            == 200
        )


def test_priority_and_filters_reach_studies_older_than_the_page_limit(engine: Any) -> None:
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        add_study(session, "1.2.9.1", T0, positives=("Pneumothorax",))  # the oldest: critical
        add_study(session, "1.2.9.2", T0 + timedelta(minutes=1), positives=("Cardiomegaly",))
        add_study(session, "1.2.9.3", T0 + timedelta(minutes=2), state="dead")
        add_study(
            session,
            "1.2.9.4",
            T0 + timedelta(minutes=3),
            state="skipped",
            positives=("Cardiomegaly",),
            reason="lateral view",
        )
        for n in range(30):  # newer, routine studies: more than fit on the page
            add_study(session, f"1.2.8.{n + 1}", T0 + timedelta(hours=1, minutes=n))
    critical = ("Pneumothorax",)
    with session_scope(factory) as session:
        rows = worklist(session, critical=critical, limit=10)
        assert len(rows) == 10
        assert [r.study_instance_uid for r in rows[:3]] == ["1.2.9.1", "1.2.9.2", "1.2.8.30"]
        assert [r.priority for r in rows[:3]] == ["critical", "abnormal", "routine"]
        assert rows[0].top_findings[0].label == "Pneumothorax"
        found = worklist(
            session, critical=critical, limit=10, where=WorklistFilter(finding="cardiomegaly")
        )
        assert [r.study_instance_uid for r in found] == ["1.2.9.2"]  # not the skipped one
        failed = worklist(
            session, critical=critical, limit=10, where=WorklistFilter(status="failed")
        )
        assert [(r.study_instance_uid, r.status) for r in failed] == [("1.2.9.3", "failed")]
        skipped = worklist(
            session, critical=critical, limit=5, where=WorklistFilter(status="not_analysed")
        )
        assert [(r.study_instance_uid, r.priority) for r in skipped] == [("1.2.9.4", "routine")]
        done = worklist(session, critical=critical, limit=100, where=WorklistFilter(status="done"))
        assert len(done) == 32 and all(r.status == "done" for r in done)


def test_finding_filter_is_a_list_of_the_models_labels_and_anything_else_gets_422(
    engine: Any, tmp_path: Path
) -> None:
    db = web_db(engine, tmp_path)
    with db.session() as session:
        add_study(session, "1.2.7.1", T0, positives=("Cardiomegaly",))
        add_study(session, "1.2.7.2", T0, positives=("Effusion",), negatives=())
    log_in(db.client)
    page = db.client.get("/worklist").text
    assert '<select name="finding" id="filter-finding">' in page
    assert '<option value="Cardiomegaly" >' in page and '<option value="Pneumothorax" >' in page
    assert '<input name="finding"' not in page
    for path in ("/worklist", "/api/v1/worklist"):
        refused = db.client.get(path, params={"finding": "DOE^JANE"})
        assert refused.status_code == 422 and "DOE" not in refused.text
        assert db.client.get(path, params={"finding": "cardiomegaly"}).status_code == 200
    items = db.client.get("/api/v1/worklist", params={"finding": "Cardiomegaly"}).json()["items"]
    assert [i["study_instance_uid"] for i in items] == ["1.2.7.1"]


@pytest.fixture
def tokyo_engine(db_url: str) -> Iterator[Engine]:
    """A migrated database whose PostgreSQL sessions run in Asia/Tokyo (UTC+9)."""
    url = db_url if db_url.startswith("sqlite") else db_url + "?options=-c%20timezone%3DAsia/Tokyo"
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_times_labelled_utc_are_utc_on_a_database_in_another_time_zone(
    tokyo_engine: Engine, tmp_path: Path
) -> None:
    db = web_db(tokyo_engine, tmp_path)
    with db.session() as session:
        add_study(session, "1.2.6.1", T0)
        add_feedback(
            session,
            study_instance_uid="1.2.6.1",
            label="Effusion",
            verdict="agree",
            comment="",
            username="rad",
            now=T0,
        )
    log_in(db.client)
    assert "2026-03-02 08:00 UTC" in db.client.get("/worklist").text
    rows = db.client.get("/feedback.csv").text.splitlines()
    assert rows[1].startswith("2026-03-02T08:00:00+00:00,rad,1.2.6.1,")
