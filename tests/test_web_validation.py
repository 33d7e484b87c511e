"""The admin page of the local validation (``/admin/validation``) on a real migrated database
with two configured models, one live and one shadow, and rows seeded through the ORM: the
SHADOW badge, the mode after a promotion, job counts, operating points, the embedded report,
the drift chart and its alarm banner, and the refusal of a radiologist."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config.models import DriftSettings, ModelSpec
from dicom_node.db.models import Job, Study
from dicom_node.db.session import make_session_factory, session_scope
from dicom_node.db.validation import DriftPoint, ModelModeChange, OperatingPoints, ValidationReport
from dicom_node.web.app import build_app
from dicom_node.web.users import add_user
from tests.conftest import make_settings
from tests.web_db import T0, Clock, log_in
from tests.web_support import PASSWORD

LIVE = "primary"
SHADOW = "candidate"
BOUND = 3.0
SHADOW_TEXT = "nothing is delivered to PACS or shown to radiologists"


@dataclass
class Site:
    client: TestClient
    factory: sessionmaker[Session]

    def page(self) -> str:
        response = self.client.get("/admin/validation")
        assert response.status_code == 200, response.text[:500]
        return response.text


@pytest.fixture
def site(engine: Any, tmp_path: Path) -> Site:
    """The web app with a live and a shadow model, and an admin (logged in)."""
    settings = make_settings(
        tmp_path,
        str(engine.url.render_as_string(hide_password=False)),
        models=(
            ModelSpec(LIVE, "densenet121-res224-all"),
            ModelSpec(SHADOW, "densenet121-res224-chex", mode="shadow"),
        ),
        drift=DriftSettings(bound=BOUND),
    )
    factory = make_session_factory(engine)
    clock = Clock()
    with session_scope(factory) as session:
        add_user(session, username="admin", password=PASSWORD, role="admin", now=clock())
    client = TestClient(build_app(settings, factory, clock=clock), follow_redirects=False)
    log_in(client, "admin")
    return Site(client, factory)


def panel(page: str, model: str) -> str:
    """The part of the page about ``model`` (its card, the embedded report included)."""
    for chunk in page.split('<section class="card model-panel"')[1:]:
        if chunk.lstrip().startswith(f'id="model-{model}"'):
            return chunk
    raise AssertionError(f"no panel for {model}")


def report_body(model: str) -> dict[str, Any]:
    """A minimal report in the format of ``validation.report``: one finding with enough
    cases, one with too few."""
    return {
        "model": {
            "name": model,
            "version": "test",
            "weights_sha256": "ab" * 32,
            "weights_status": "verified",
            "mode": "shadow",
        },
        "generated_at": T0.isoformat(),
        "period": {"since": None, "until": None},
        "studies": 40,
        "labelled_studies": 40,
        "thresholds_version": "model defaults",
        "settings": {
            "target_sensitivity": 0.95,
            "rule": "sensitivity",
            "bootstrap_resamples": 200,
            "ece_bins": 15,
            "min_cases": 10,
        },  # fmt: skip
        "findings": {
            "Effusion": {
                "n_pos": 20,
                "n_neg": 20,
                "label_sources": ["csv"],
                "status": "ok",
                "auroc": 0.91,
                "auroc_ci": [0.82, 0.99],
                "auroc_ci_bootstrap": [0.81, 0.98],
                "roc": {"fpr": [0.0, 0.1, 1.0], "tpr": [0.0, 0.8, 1.0]},
                "threshold": 0.5,
                "sensitivity": 0.8,
                "specificity": 0.9,
                "ppv": 0.89,
                "npv": 0.82,
                "ece": 0.04,
            },  # fmt: skip
            "Pneumothorax": {
                "n_pos": 2,
                "n_neg": 38,
                "label_sources": ["csv"],
                "status": "too few cases",
                "auroc": None,
            },  # fmt: skip
        },
    }


def add_drift(
    session: Session, model: str, combined: list[float], start: datetime = T0, **latest: Any
) -> None:
    """Drift points an hour apart from ``start``; ``latest`` sets columns of the last one."""
    for i, score in enumerate(combined):
        values: dict[str, Any] = {"alarm": False, "moved": "[]", "statistics": "[]"}
        if i == len(combined) - 1:
            values.update(latest)
        session.add(
            DriftPoint(
                model_name=model,
                computed_at=start + timedelta(hours=i),
                n_reference=500,
                n_recent=300,
                combined=score,
                **values,
            )
        )


def vertices(page: str, model: str) -> list[tuple[float, float]]:
    match = re.search(r'<polyline class="drift-series" points="([^"]*)"', panel(page, model))
    assert match is not None
    return [(float(x), float(y)) for x, y in (v.split(",") for v in match.group(1).split())]


def test_the_shadow_badge_marks_the_shadow_model_until_a_promotion_is_recorded(
    site: Site,
) -> None:
    page = site.page()  # a fresh install: nothing but the configuration
    live, shadow = panel(page, LIVE), panel(page, SHADOW)
    assert "shadow-badge" in shadow and SHADOW_TEXT in shadow
    assert "SHADOW" not in live and SHADOW_TEXT not in live
    assert "densenet121-res224-chex" in shadow and "(configuration)" in shadow
    for name, part in ((LIVE, live), (SHADOW, shadow)):
        assert (
            'No validation report yet: run <span class="mono">'
            f"dicom-node validate report --model {name} --out DIR</span>"
        ) in part
        assert "model defaults" in part and "No drift computed yet" in part
        assert "No analysis jobs yet." in part
    assert "drift-alarm" not in page
    with session_scope(site.factory) as session:
        session.add(
            ModelModeChange(
                model_name=SHADOW,
                mode="live",
                weights_sha256="ab" * 32,
                report_sha256=None,
                forced=False,
                changed_at=T0,
                changed_by="admin",
            )
        )
    shadow = panel(site.page(), SHADOW)
    assert "shadow-badge" not in shadow and SHADOW_TEXT not in shadow
    assert "promoted 2026-03-02 08:00 UTC by admin" in shadow


def add_jobs(session: Session, jobs: list[tuple[str, str, str]]) -> None:
    """One study per (kind, target, state) with that one job."""
    for i, (kind, target, state) in enumerate(jobs):
        uid = f"1.2.9.{i}"
        session.add(Study(study_instance_uid=uid, first_received_at=T0, last_received_at=T0))
        session.flush()
        session.add(
            Job(
                kind=kind,
                state=state,
                study_instance_uid=uid,
                study_revision=1,
                target=target,
                attempts=1,
                created_at=T0,
                updated_at=T0,
            )
        )


def job_rows(part: str) -> list[tuple[str, str]]:
    table = re.search(r'<table class="model-jobs">.*?</table>', part, re.S)
    assert table is not None
    return re.findall(r"<tr><td>(\w+)</td><td>(\d+)</td></tr>", table.group(0))


def test_each_panel_shows_its_models_jobs_latest_report_and_operating_points(
    site: Site,
) -> None:
    body = json.dumps(report_body(SHADOW))
    with session_scope(site.factory) as session:
        add_jobs(
            session,
            [("analysis", LIVE, "done"), ("analysis", LIVE, "done"),
             ("analysis", LIVE, "queued"), ("analysis", SHADOW, "dead"),
             ("delivery", LIVE, "done")],
        )  # fmt: skip
        session.add(
            ValidationReport(
                model_name=SHADOW,
                weights_sha256="ab" * 32,
                sha256="cd" * 32,
                generated_at=T0,
                studies=40,
                body=body,
            )
        )
        for version in (1, 2):
            session.add(
                OperatingPoints(
                    model_name=SHADOW,
                    version=version,
                    weights_sha256="ab" * 32,
                    report_sha256=f"{version}e" * 32,
                    applied_by="admin",
                    applied_at=T0,
                    thresholds=json.dumps({"Effusion": 0.25 + version / 10}),
                )
            )
    page = site.page()
    shadow, live = panel(page, SHADOW), panel(page, LIVE)
    assert job_rows(live) == [("done", "2"), ("queued", "1")]
    assert job_rows(shadow) == [("dead", "1")]
    assert shadow.count('<section class="vr-report">') == 1
    assert "Validation report: candidate" in shadow and "too few cases" in shadow
    assert "cd" * 32 in shadow and "Generated 2026-03-02 08:00 UTC" in shadow
    assert "<dd>v2</dd>" in shadow and ("2e" * 6) in shadow and "0.450" in shadow
    assert "<dd>v1</dd>" not in shadow and ("1e" * 6) not in shadow and "0.350" not in shadow
    assert "vr-report" not in live and "No validation report yet" in live
    assert "model defaults" in live


def test_the_drift_banner_names_the_moved_fields_while_the_latest_point_alarms(
    site: Site,
) -> None:
    statistics = [
        {"field": "ViewPosition", "test": "chi2", "value": 41.0, "p_value": 1e-6, "z": 5.2},
        {"field": "Manufacturer", "test": "chi2", "value": 30.0, "p_value": 1e-4, "z": 4.1},
        {"field": "score:Effusion", "test": "ks", "value": 0.05, "p_value": 0.6, "z": 0.4},
    ]
    with session_scope(site.factory) as session:
        add_drift(
            session, SHADOW, [0.5, 1.0, 4.0], alarm=True,
            moved=json.dumps(["ViewPosition", "Manufacturer", "<b>x</b>"]),
            statistics=json.dumps(statistics),
        )  # fmt: skip
    page = site.page()
    banner = re.search(r'<div class="banner drift-alarm[^>]*>(.*?)</div>', page)
    assert banner is not None and page.index("drift-alarm") < page.index("model-panel")
    assert banner.group(1) == (
        "Drift alarm: model candidate — fields moved: ViewPosition, Manufacturer, "
        "&lt;b&gt;x&lt;/b&gt;"
    )
    table = re.search(r'<table class="drift-statistics">.*?</table>', panel(page, SHADOW), re.S)
    assert table is not None
    assert "ViewPosition" in table.group(0) and "5.20" in table.group(0)
    assert "score:Effusion" not in table.group(0)
    with session_scope(site.factory) as session:  # a newer point without an alarm
        add_drift(session, SHADOW, [1.2], start=T0 + timedelta(days=1))
    assert "drift-alarm" not in site.page()


def test_the_drift_chart_has_one_vertex_per_point_and_the_bound_as_a_dashed_line(
    site: Site,
) -> None:
    scores = [0.5, 2.0, 1.0, 3.5, 0.2]
    with session_scope(site.factory) as session:
        add_drift(session, LIVE, scores)
        add_drift(session, SHADOW, [0.1] * 205)
    page = site.page()
    points = vertices(page, LIVE)
    assert len(points) == len(scores)
    xs, ys = [x for x, _ in points], [y for _, y in points]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    assert sorted(range(5), key=lambda i: ys[i]) == sorted(range(5), key=lambda i: -scores[i])
    bound = re.search(r'<line class="drift-bound"[^>]*y1="([\d.]+)"[^>]*stroke-dasharray', page)
    assert bound is not None and ys[3] < float(bound.group(1)) < ys[1]  # 3.5 > 3.0 > 2.0
    assert len(vertices(page, SHADOW)) == 200  # the latest 200 points only


def test_a_radiologist_is_refused_and_a_visitor_is_sent_to_log_in(site: Site) -> None:
    assert 'href="/admin/validation"' in site.client.get("/admin").text
    site.client.cookies.clear()
    visitor = site.client.get("/admin/validation")
    assert visitor.status_code == 303 and visitor.headers["location"].startswith("/login")
    with session_scope(site.factory) as session:
        add_user(session, username="rad", password=PASSWORD, role="radiologist", now=T0)
    log_in(site.client, "rad")
    refused = site.client.get("/admin/validation")
    assert refused.status_code == 403 and "for administrators" in refused.text
