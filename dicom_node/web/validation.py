"""The admin page of the local validation: for every configured model its mode (and where
that mode comes from), its analysis jobs, the operating points in force, its latest
validation report, and its drift over time.

Only admins reach it (a radiologist gets 403, as on the other admin pages).  The page reads
the database only (bar the ``admin.viewed`` audit row); reports, operating points and modes
are written by the CLI (``dicom-node validate ...``, ``dicom-node models promote``).  The
drift chart is an inline SVG drawn here (no JavaScript, no stylesheet needed), and a drift
alarm on a model's latest point raises a banner at the top of the page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from markupsafe import Markup
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.audit.trail import record_audit
from dicom_node.clock import as_utc
from dicom_node.config.models import ModelMode, ModelSpec
from dicom_node.db.models import AnalysisResult, Job, JobKind
from dicom_node.db.validation import DriftPoint, OperatingPoints, ValidationReport
from dicom_node.validation.html import render_report_section
from dicom_node.validation.modes import effective_mode
from dicom_node.validation.style import REPORT_CSS
from dicom_node.web.auth import Principal, admin_principal
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.rendering import render

log = structlog.get_logger(__name__)
router = APIRouter(include_in_schema=False)

DRIFT_POINTS_SHOWN = 200
SHA_SHOWN = 12
CHART_WIDTH = 640
CHART_HEIGHT = 180
CHART_PAD = 28  # room for the axis labels
CHART_HEADROOM = 1.1  # the y axis reaches this much above the highest score (or bound)


@dataclass(frozen=True)
class PointsInForce:
    """The latest operating points of a model (``validate thresholds apply``)."""

    version: int
    report_sha256: str
    weights_sha256: str
    applied_at: datetime
    applied_by: str | None
    thresholds: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LatestReport:
    """The latest validation report of a model, rendered as an HTML fragment."""

    generated_at: datetime
    sha256: str
    studies: int
    section: Markup | None  # None: the stored body could not be read
    problem: str | None


@dataclass(frozen=True)
class Chart:
    """The drift chart's geometry: the polyline's ``x,y`` vertices, one per point, and the
    y of the dashed alarm bound (SVG coordinates, y down)."""

    width: int
    height: int
    vertices: str
    bound_y: float
    top: float  # the score at the top of the plot area
    first: datetime
    last: datetime
    last_x: float
    last_y: float


@dataclass(frozen=True)
class Statistic:
    """One drift statistic of the latest point (|z| above the bound)."""

    field: str
    test: str
    value: float | None
    p_value: float | None
    z: float


@dataclass(frozen=True)
class Drift:
    """A model's drift series (up to ``DRIFT_POINTS_SHOWN`` points) and its latest point."""

    points: int
    chart: Chart
    latest_at: datetime
    combined: float
    n_reference: int
    n_recent: int
    alarm: bool
    moved: tuple[str, ...]
    outliers: tuple[Statistic, ...]


@dataclass(frozen=True)
class ModelPanel:
    """Everything the page shows for one configured model."""

    spec: ModelSpec
    mode: str
    mode_source: str
    jobs: tuple[tuple[str, int], ...]  # (state, count) of its analysis jobs
    results: int
    points: PointsInForce | None
    report: LatestReport | None
    drift: Drift | None

    @property
    def shadow(self) -> bool:
        return self.mode == ModelMode.SHADOW.value


def job_targets(spec: ModelSpec, specs: Sequence[ModelSpec]) -> tuple[str, ...]:
    """The ``Job.target`` values of the model's analysis jobs: its name, and for the first
    model also "" (a job queued without a model is the worker's first model's)."""
    return (spec.name, "") if specs and specs[0] == spec else (spec.name,)


def job_counts(session: Session, targets: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """Analysis jobs for ``targets`` by state, in state order."""
    rows = session.execute(
        select(Job.state, func.count())
        .where(Job.kind == JobKind.ANALYSIS.value, Job.target.in_(list(targets)))
        .group_by(Job.state)
    )
    return tuple(sorted((state, int(count)) for state, count in rows))


def result_count(session: Session, model_name: str) -> int:
    """How many analysis results the model has stored."""
    query = select(func.count()).where(AnalysisResult.model_name == model_name)
    return int(session.scalar(query.select_from(AnalysisResult)) or 0)


def points_in_force(session: Session, model_name: str) -> PointsInForce | None:
    """The model's latest operating-points version, or None (the model's defaults)."""
    row = session.scalars(
        select(OperatingPoints)
        .where(OperatingPoints.model_name == model_name)
        .order_by(OperatingPoints.version.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    thresholds = json.loads(row.thresholds)
    return PointsInForce(
        row.version,
        row.report_sha256,
        row.weights_sha256,
        row.applied_at,
        row.applied_by,
        tuple(sorted((str(k), float(v)) for k, v in thresholds.items())),
    )


def latest_report(session: Session, model_name: str) -> LatestReport | None:
    """The model's newest report with its section rendered; a body that cannot be rendered
    gives a note instead, so one bad row does not take the page down."""
    row = session.scalars(
        select(ValidationReport)
        .where(ValidationReport.model_name == model_name)
        .order_by(ValidationReport.generated_at.desc(), ValidationReport.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    section, problem = None, None
    try:
        section = Markup(render_report_section(json.loads(row.body), inline_style=False))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.error("web.validation_report_unreadable", model=model_name, error=type(exc).__name__)
        problem = f"the stored report could not be shown ({type(exc).__name__})"
    return LatestReport(row.generated_at, row.sha256, row.studies, section, problem)


def drift_series(session: Session, model_name: str) -> list[DriftPoint]:
    """The model's latest ``DRIFT_POINTS_SHOWN`` drift points, oldest first."""
    rows = session.scalars(
        select(DriftPoint)
        .where(DriftPoint.model_name == model_name)
        .order_by(DriftPoint.computed_at.desc(), DriftPoint.id.desc())
        .limit(DRIFT_POINTS_SHOWN)
    ).all()
    return list(reversed(rows))


def drift_chart(points: Sequence[DriftPoint], bound: float) -> Chart:
    """The polyline of the combined score over time (one vertex per point) and the bound's
    y.  A single point, or points at one instant, sit in the middle of the x axis; a score
    that is not a finite number is drawn at the top."""
    times = [as_utc(p.computed_at).timestamp() for p in points]
    scores = [float(p.combined) for p in points]
    top = max([bound, *(s for s in scores if math.isfinite(s))]) * CHART_HEADROOM or 1.0
    span = max(times) - min(times)
    inner_w, inner_h = CHART_WIDTH - 2 * CHART_PAD, CHART_HEIGHT - 2 * CHART_PAD

    def x(t: float) -> float:
        return CHART_PAD + ((t - times[0]) / span if span > 0 else 0.5) * inner_w

    def y(score: float) -> float:
        share = min(max(score, 0.0), top) / top if math.isfinite(score) else 1.0
        return CHART_PAD + (1.0 - share) * inner_h

    vertices = " ".join(f"{x(t):.1f},{y(s):.1f}" for t, s in zip(times, scores, strict=True))
    return Chart(
        CHART_WIDTH,
        CHART_HEIGHT,
        vertices,
        round(y(bound), 1),
        top,
        points[0].computed_at,
        points[-1].computed_at,
        round(x(times[-1]), 1),
        round(y(scores[-1]), 1),
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def outliers(point: DriftPoint, bound: float) -> tuple[Statistic, ...]:
    """The latest point's statistics with |z| above ``bound``, largest |z| first."""
    found = []
    for entry in json.loads(point.statistics or "[]"):
        z = _number(entry.get("z")) if isinstance(entry, dict) else None
        if z is None or not abs(z) > bound:
            continue
        found.append(
            Statistic(
                str(entry.get("field", "")),
                str(entry.get("test", "")),
                _number(entry.get("value")),
                _number(entry.get("p_value")),
                z,
            )
        )
    return tuple(sorted(found, key=lambda s: -abs(s.z)))


def model_drift(session: Session, model_name: str, bound: float) -> Drift | None:
    """The model's drift series and latest point, or None before the first point."""
    points = drift_series(session, model_name)
    if not points:
        return None
    latest = points[-1]
    return Drift(
        len(points),
        drift_chart(points, bound),
        latest.computed_at,
        float(latest.combined),
        latest.n_reference,
        latest.n_recent,
        bool(latest.alarm),
        tuple(str(field) for field in json.loads(latest.moved or "[]")),
        outliers(latest, bound),
    )


def model_panel(
    session: Session, spec: ModelSpec, specs: Sequence[ModelSpec], bound: float
) -> ModelPanel:
    """One model's part of the page."""
    mode, source = effective_mode(session, spec)
    return ModelPanel(
        spec,
        mode,
        source,
        job_counts(session, job_targets(spec, specs)),
        result_count(session, spec.name),
        points_in_force(session, spec.name),
        latest_report(session, spec.name),
        model_drift(session, spec.name, bound),
    )


@router.get("/admin/validation/report.css")
def report_css(principal: Principal = Depends(admin_principal)) -> Response:
    """The embedded report's styles, from this origin (the CSP refuses inline styles)."""
    return Response(REPORT_CSS, media_type="text/css")


@router.get("/admin/validation")
def validation_page(
    request: Request,
    principal: Principal = Depends(admin_principal),
    context: WebContext = Depends(get_context),
) -> Response:
    specs = context.settings.model_specs
    bound = context.settings.drift.bound
    with context.transaction() as session:
        panels = [model_panel(session, spec, specs, bound) for spec in specs]
        record_audit(
            session,
            event_type="admin.viewed",
            now=context.clock(),
            username=principal.username,
            page="validation",
        )
    alarms = [p for p in panels if p.drift is not None and p.drift.alarm]
    return render(
        context,
        request,
        "validation.html",
        principal,
        panels=panels,
        alarms=alarms,
        bound=bound,
        sha_shown=SHA_SHOWN,
    )
