"""The drift monitor's database side: windows of analysed studies in, drift points out.

Each model's analysis jobs (done or skipped) are rows: the score of every finding, the
analysed image's header fields (``validation.features``) and the gating outcome ("analysed",
or the kind of reason a study was not).  The reference window is the model's first
``[drift] reference_studies`` jobs, or the period of its latest validation report
(``reference = "validation"``); the recent window the last ``window_studies`` jobs of the
last ``window_days``, the reference's own jobs left out.  ``validation.drift`` compares
them; the point is stored (the time series the admin page plots and the metrics export),
and an alarm that starts, or that names other fields, is an audit event ``model.drift``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.trail import record_audit
from dicom_node.clock import as_utc
from dicom_node.config.models import DriftSettings
from dicom_node.db.models import AnalysisResult, Finding, Job, JobKind, JobState
from dicom_node.db.session import read_scope, session_scope
from dicom_node.db.validation import DriftPoint, ValidationReport
from dicom_node.validation.drift import Columns, DriftResult, drift, summarise
from dicom_node.validation.features import CATEGORICAL_FIELDS, NUMERIC_FIELDS

log = structlog.get_logger(__name__)
GATING = "gating"
ANALYSED = "analysed"
SCORE_PREFIX = "score:"


@dataclass(frozen=True)
class JobRow:
    job_id: int
    finished_at: datetime
    gating: str
    features: dict[str, float | str | None]
    scores: dict[str, float]


def gating_of(state: str, reason: str | None) -> str:
    """The gating category of a job: "analysed", or its first reason without the "not
    analysed:" prefix and with numbers as N ("view LL is not PA or AP", "patient under N")."""
    if state == JobState.DONE:
        return ANALYSED
    first = (reason or "not analysed").split("; ", 1)[0]
    first = first.removeprefix("not analysed: ").strip() or "not analysed"
    return re.sub(r"\d+(\.\d+)?", "N", first)[:64]


def model_rows(
    session: Session, model_name: str, *, since: datetime | None = None, limit: int | None = None
) -> list[JobRow]:
    """The model's finished analysis jobs (done or skipped), oldest first."""
    query = (
        select(Job.id, Job.state, Job.reason, Job.updated_at, AnalysisResult.features)
        .outerjoin(AnalysisResult, AnalysisResult.job_id == Job.id)
        .where(
            Job.kind == JobKind.ANALYSIS.value,
            Job.target == model_name,
            Job.state.in_((JobState.DONE.value, JobState.SKIPPED.value)),
        )
        .order_by(Job.id)
    )
    if since is not None:
        query = query.where(Job.updated_at >= since)
    if limit is not None:
        query = query.limit(limit)
    jobs = session.execute(query).all()
    scores: dict[int, dict[str, float]] = {}
    ids = [job_id for job_id, state, *_ in jobs if state == JobState.DONE]
    for start in range(0, len(ids), 500):
        for job_id, label, probability in session.execute(
            select(Finding.job_id, Finding.label, Finding.probability).where(
                Finding.job_id.in_(ids[start : start + 500])
            )
        ):
            scores.setdefault(job_id, {})[label] = probability
    return [
        JobRow(
            job_id,
            updated_at,
            gating_of(state, reason),
            json.loads(features) if features else {},
            scores.get(job_id, {}),
        )
        for job_id, state, reason, updated_at, features in jobs
    ]


def columns_of(rows: Sequence[JobRow], findings: Sequence[str]) -> Columns:
    """The analysed rows' scores and header fields as the drift statistics' columns."""
    numeric = {
        f"{SCORE_PREFIX}{name}": np.array([r.scores.get(name, np.nan) for r in rows], dtype=float)
        for name in findings
    }
    for name in NUMERIC_FIELDS:
        numeric[name] = np.array([_float(r.features.get(name)) for r in rows], dtype=float)
    categorical: dict[str, list[str | None]] = {
        name: [_text(r.features.get(name)) for r in rows] for name in CATEGORICAL_FIELDS
    }
    return Columns(numeric=numeric, categorical=categorical)


def _float(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else np.nan


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def windows(
    session: Session, model_name: str, settings: DriftSettings, now: datetime
) -> tuple[list[JobRow], list[JobRow]]:
    """The reference and recent windows of the model (see the module docstring)."""
    reference = _reference(session, model_name, settings)
    taken = {row.job_id for row in reference}
    recent = [
        row
        for row in model_rows(session, model_name, since=now - timedelta(days=settings.window_days))
        if row.job_id not in taken
    ][-settings.window_studies :]
    return reference, recent


def _reference(session: Session, model_name: str, settings: DriftSettings) -> list[JobRow]:
    if settings.reference == "validation":
        report = session.scalars(
            select(ValidationReport)
            .where(ValidationReport.model_name == model_name)
            .order_by(ValidationReport.id.desc())
            .limit(1)
        ).first()
        if report is not None:
            rows = model_rows(session, model_name, since=report.period_since)
            until = report.period_until or report.generated_at
            return [row for row in rows if as_utc(row.finished_at) < as_utc(until)]
    return model_rows(session, model_name, limit=settings.reference_studies)


def compare(reference: list[JobRow], recent: list[JobRow], settings: DriftSettings) -> DriftResult:
    """Scores and header fields of the analysed studies, and the gating of all of them.

    A study the gating skipped has no scores and no analysed image, so its missing fields
    must not count as a change of the header fields: those are compared over analysed
    studies only, and the gating outcome over every study.
    """
    findings = sorted({name for row in reference for name in row.scores})
    analysed = drift(
        columns_of([r for r in reference if r.gating == ANALYSED], findings),
        columns_of([r for r in recent if r.gating == ANALYSED], findings),
        bound=settings.bound,
        min_rows=settings.min_studies,
    )
    gating = drift(
        Columns(categorical={GATING: [r.gating for r in reference]}),
        Columns(categorical={GATING: [r.gating for r in recent]}),
        bound=settings.bound,
        min_rows=settings.min_studies,
    )
    statistics = analysed.statistics + gating.statistics
    return summarise(statistics, settings.bound, len(reference), len(recent))


def recompute(
    factory: sessionmaker[Session], model_name: str, settings: DriftSettings, now: datetime
) -> tuple[DriftResult, DriftPoint]:
    """Compare the windows, store the point, audit an alarm that starts or moves.

    The windows are read in a read-only transaction and compared outside any: only the
    point's own short transaction takes the write lock, so ingest is not held up.
    """
    with read_scope(factory) as session:
        reference, recent = windows(session, model_name, settings, now)
    result = compare(reference, recent, settings)
    with session_scope(factory) as session:
        return result, store_point(session, model_name, result, now)


def store_point(
    session: Session, model_name: str, result: DriftResult, now: datetime
) -> DriftPoint:
    """The drift point, and the audit event of an alarm that starts or names other fields."""
    previous = latest_point(session, model_name)
    point = DriftPoint(
        model_name=model_name,
        computed_at=now,
        n_reference=result.n_reference,
        n_recent=result.n_recent,
        combined=float(result.combined),
        alarm=bool(result.alarm),
        moved=json.dumps(list(result.moved)),
        statistics=json.dumps(
            [
                {"field": s.field, "test": s.test, "value": s.value, "p_value": s.p_value, "z": s.z}
                for s in result.statistics
            ]  # fmt: skip
        ),
    )
    session.add(point)
    if result.alarm and (
        previous is None or not previous.alarm or json.loads(previous.moved) != list(result.moved)
    ):
        record_audit(
            session,
            event_type="model.drift",
            now=now,
            outcome="failure",
            model=model_name,
            combined=round(float(result.combined), 3),
            moved=list(result.moved),
            n_reference=result.n_reference,
            n_recent=result.n_recent,
        )
        log.warning("model.drift", model=model_name, moved=list(result.moved))
    session.flush()
    return point


def latest_point(session: Session, model_name: str) -> DriftPoint | None:
    return session.scalars(
        select(DriftPoint)
        .where(DriftPoint.model_name == model_name)
        .order_by(DriftPoint.id.desc())
        .limit(1)
    ).first()


def latest_points(session: Session) -> list[DriftPoint]:
    """Each model's latest drift point."""
    newest = select(func.max(DriftPoint.id)).group_by(DriftPoint.model_name)
    return list(
        session.scalars(
            select(DriftPoint).where(DriftPoint.id.in_(newest)).order_by(DriftPoint.model_name)
        )
    )


def tick_drift(
    factory: sessionmaker[Session],
    model_names: Sequence[str],
    settings: DriftSettings,
    now: datetime,
) -> None:
    """The scheduler's recomputation for every configured model; an error is logged (no
    patient data) and waits for the next tick."""
    for name in model_names:
        try:
            recompute(factory, name, settings, now)
        except Exception as exc:  # the monitor must never stop the scheduler
            log.error("drift.failed", model=name, error_type=type(exc).__name__)
