"""Only verified weights set worklist priority: an untrained or unverified model's positive
critical finding is listed, labelled, but never critical and never moved up."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicom_node.db.models import AnalysisResult
from dicom_node.web.queries import worklist
from dicom_node.web.users import create_token
from tests.web_db import T0, add_study, log_in, web_db

VERIFIED_CRITICAL, ROUTINE, UNTRAINED, UNVERIFIED = "1.2.5.1", "1.2.5.2", "1.2.5.3", "1.2.5.4"


def _seed(db: Any) -> None:
    """The verified critical study is the oldest; the two untrusted ones are the newest."""
    with db.session() as session:
        add_study(session, VERIFIED_CRITICAL, T0, positives=("Pneumothorax",))
        add_study(session, ROUTINE, T0 + timedelta(minutes=1))
        add_study(session, UNTRAINED, T0 + timedelta(minutes=2), positives=("Pneumothorax",))
        add_study(session, UNVERIFIED, T0 + timedelta(minutes=3), positives=("Pneumothorax",))
        for uid, status in ((UNTRAINED, "untrained"), (UNVERIFIED, "unverified")):
            result = session.scalars(
                select(AnalysisResult).where(AnalysisResult.study_instance_uid == uid)
            ).one()
            result.weights_status = status


def test_untrained_or_unverified_critical_finding_is_not_ordered_first_nor_flagged_critical(
    engine: Any, tmp_path: Path
) -> None:
    db = web_db(engine, tmp_path)
    _seed(db)
    expected = [
        (VERIFIED_CRITICAL, "critical", ""),
        (UNVERIFIED, "routine", "UNVERIFIED WEIGHTS"),
        (UNTRAINED, "routine", "UNTRAINED DEMO MODEL"),
        (ROUTINE, "routine", ""),
    ]
    with db.session() as session:
        rows = worklist(session, critical=("Pneumothorax",))
        assert [(r.study_instance_uid, r.priority, r.model_warning) for r in rows] == expected
        assert rows[2].top_findings[0].label == "Pneumothorax"  # still listed, labelled
        limited = worklist(session, critical=("Pneumothorax",), limit=1)  # order is in SQL
        assert [r.study_instance_uid for r in limited] == [VERIFIED_CRITICAL]
        token = create_token(session, name="ris", scope="read", now=T0)
    items = db.client.get("/api/v1/worklist", headers={"Authorization": f"Bearer {token}"}).json()[
        "items"
    ]
    assert [(i["study_instance_uid"], i["priority"], i["model_warning"]) for i in items] == expected
    log_in(db.client)
    page = db.client.get("/worklist").text
    assert page.count('class="prio-critical"') == 1
    assert f'<tr class="prio-routine" data-study="{UNTRAINED}">' in page
    study = db.client.get(f"/studies/{UNTRAINED}").text
    assert '<span class="badge routine">routine</span>' in study
    assert "UNTRAINED DEMO MODEL" in study and "badge critical" not in study
