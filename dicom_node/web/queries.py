"""Read the worklist and one study's results for the web pages and the API.

Small query functions returning plain dataclasses; the only rule here is the worklist order:
studies with a positive *critical* finding (``[web] critical_findings``) first, then studies
with any positive finding, then the rest; within each, the most recently received first.
Only results from verified weights set priority: a study whose current result came from an
untrained or unverified model is routine (listed, with its findings and the model warning,
but never flagged critical or moved up by numbers nobody has validated).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, exists, func, or_, select
from sqlalchemy.orm import Session

from dicom_node.clock import as_utc
from dicom_node.config.models import ModelMode
from dicom_node.db.models import AnalysisResult, Finding, Job, JobKind, JobState, Study
from dicom_node.errors import InvalidRequestError
from dicom_node.inference.card import model_labels
from dicom_node.results import UNTRAINED_LABEL, UNVERIFIED_LABEL

STATUSES = ("queued", "analysing", "done", "not_analysed", "failed")
STATUS_TEXT = {
    "queued": "queued",
    "analysing": "analysing",
    "done": "done",
    "not_analysed": "not analysed",
    "failed": "failed",
}
PRIORITIES = ("critical", "abnormal", "routine")
VERIFIED = "verified"  # the only weights_status whose results set priority
MAX_ROWS = 500
TOP_FINDINGS = 3
_JOB_STATUS = {
    JobState.QUEUED.value: "queued",
    JobState.RUNNING.value: "analysing",
    JobState.DONE.value: "done",
    JobState.SKIPPED.value: "not_analysed",
    JobState.FAILED.value: "failed",
    JobState.DEAD.value: "failed",
}


@dataclass(frozen=True)
class FindingRow:
    label: str
    probability: float
    threshold: float | None
    positive: bool
    boxes: tuple[tuple[int, int, int, int], ...]
    has_heatmap: bool = True  # False: the model gives no heatmap (no CAM output)


@dataclass(frozen=True)
class WorklistRow:
    study_instance_uid: str
    received_at: datetime
    accession_number: str
    patient_name: str
    patient_id: str
    study_description: str
    status: str  # one of STATUSES
    status_detail: str  # the reason (not analysed), the error (failed), or ""
    priority: str  # one of PRIORITIES
    top_findings: tuple[FindingRow, ...]
    model_warning: str  # UNTRAINED DEMO MODEL / UNVERIFIED WEIGHTS, or ""
    job_id: int | None


EARLIEST_DAY, LATEST_DAY = date(1900, 1, 1), date(2100, 12, 31)


@dataclass(frozen=True)
class WorklistFilter:
    status: str | None = None
    finding: str | None = None
    date_from: date | None = None
    date_to: date | None = None

    def __post_init__(self) -> None:
        for name in ("date_from", "date_to"):
            day = getattr(self, name)
            if day is not None and not EARLIEST_DAY <= day <= LATEST_DAY:
                raise InvalidRequestError(f"{name} must be between {EARLIEST_DAY} and {LATEST_DAY}")


def finding_labels(model_name: str, models_dir: Path) -> tuple[str, ...]:
    """The labels the configured model reports (the finding filter offers only these)."""
    return model_labels(model_name, models_dir) or ()


def known_label(text: str | None, labels: tuple[str, ...]) -> str | None:
    """``text`` as one of ``labels`` (any case), None for no filter; never echoes ``text``."""
    if not text:
        return None
    for label in labels:
        if label.lower() == text.lower():
            return label
    raise InvalidRequestError("finding must be one of the model's finding labels")


def warning_of(result: AnalysisResult | None) -> str:
    """The label a result must carry when it came from untrained or unverified weights."""
    if result is None:
        return ""
    return {"untrained": UNTRAINED_LABEL, "unverified": UNVERIFIED_LABEL}.get(
        result.weights_status, ""
    )


def radiologist_visible() -> ColumnElement[bool]:
    """Analysis jobs a radiologist may see: a shadow model's never (they are validated on
    the admin pages only); jobs from before models had modes were the live model's."""
    return or_(Job.mode.is_(None), Job.mode != ModelMode.SHADOW.value)


def current_analysis_jobs(session: Session, study_instance_uids: Iterable[str]) -> dict[str, Job]:
    """Each study's newest live analysis job that has not been superseded."""
    uids = list(study_instance_uids)
    latest: dict[str, Job] = {}
    if not uids:
        return latest
    for job in session.scalars(
        select(Job)
        .where(
            Job.kind == JobKind.ANALYSIS.value,
            Job.study_instance_uid.in_(uids),
            Job.state != JobState.SUPERSEDED.value,
            radiologist_visible(),
        )
        .order_by(Job.id)
    ):
        latest[job.study_instance_uid] = job
    return latest


def finding_rows(session: Session, job_ids: Iterable[int]) -> dict[int, list[FindingRow]]:
    """The findings of each job, positives first, then by probability."""
    ids = list(job_ids)
    rows: dict[int, list[FindingRow]] = {job_id: [] for job_id in ids}
    if not ids:
        return rows
    for finding in session.scalars(select(Finding).where(Finding.job_id.in_(ids))):
        boxes = tuple(tuple(box) for box in json.loads(finding.boxes)) if finding.boxes else ()
        rows[finding.job_id].append(
            FindingRow(
                finding.label,
                finding.probability,
                finding.threshold,
                finding.positive,
                boxes,
                finding.heatmap_path is not None,
            )
        )
    for found in rows.values():
        found.sort(key=lambda f: (not f.positive, -f.probability))
    return rows


def status_of(job: Job | None) -> tuple[str, str]:
    """The worklist status and its detail for a study's current analysis job."""
    if job is None:
        return "queued", "waiting for the study to complete"
    status = _JOB_STATUS.get(job.state, "queued")
    if status == "not_analysed":
        return status, job.reason or ""
    if status == "failed":
        retry = " (will retry)" if job.state == JobState.FAILED.value else ""
        return status, f"analysis failed{retry}"
    return status, ""


def priority_of(
    findings: list[FindingRow], critical: tuple[str, ...], result: AnalysisResult | None = None
) -> str:
    """critical (a positive critical finding), abnormal (any positive) or routine; routine
    whatever the findings when ``result`` came from untrained or unverified weights."""
    if result is not None and result.weights_status != VERIFIED:
        return "routine"
    wanted = {label.lower() for label in critical}
    positives = [f for f in findings if f.positive]
    if any(f.label.lower() in wanted for f in positives):
        return "critical"
    return "abnormal" if positives else "routine"


def worklist(
    session: Session,
    *,
    critical: tuple[str, ...],
    where: WorklistFilter = WorklistFilter(),
    limit: int = MAX_ROWS,
) -> list[WorklistRow]:
    """The worklist rows matching ``where``, in priority order (see the module docstring).

    Filtering, ordering and the limit all happen in SQL; findings are loaded only for the
    rows returned.
    """
    current = (
        select(Job.study_instance_uid, func.max(Job.id).label("job_id"))
        .where(
            Job.kind == JobKind.ANALYSIS.value,
            Job.state != JobState.SUPERSEDED.value,
            radiologist_visible(),
        )
        .group_by(Job.study_instance_uid)
        .subquery()
    )
    query = (
        select(Study, Job)
        .outerjoin(current, current.c.study_instance_uid == Study.study_instance_uid)
        .outerjoin(Job, Job.id == current.c.job_id)
    )
    query = _filtered(query, where)
    wanted = [label.lower() for label in critical]
    trusted = _verified_result()
    priority = case(
        (and_(trusted, _positive_exists(func.lower(Finding.label).in_(wanted))), 0),
        (and_(trusted, _positive_exists()), 1),
        else_=2,
    )
    query = query.order_by(
        priority, Study.first_received_at.desc(), Study.study_instance_uid
    ).limit(limit)
    pairs = [(study, job) for study, job in session.execute(query)]
    done = [job.id for _, job in pairs if job is not None and job.state == JobState.DONE.value]
    findings = finding_rows(session, done)
    results = (
        {
            r.job_id: r
            for r in session.scalars(select(AnalysisResult).where(AnalysisResult.job_id.in_(done)))
        }
        if done
        else {}
    )
    return [worklist_row(study, job, findings, results, critical) for study, job in pairs]


def _positive_exists(*conditions: Any) -> Any:
    """SQL: the (outer-joined) current job is done and has a positive finding matching."""
    return and_(
        Job.state == JobState.DONE.value,
        exists(
            select(Finding.id).where(
                Finding.job_id == Job.id, Finding.positive.is_(True), *conditions
            )
        ),
    )


def _verified_result() -> Any:
    """SQL: the (outer-joined) current job's result came from verified weights."""
    return exists(
        select(AnalysisResult.job_id).where(
            AnalysisResult.job_id == Job.id, AnalysisResult.weights_status == VERIFIED
        )
    )


def _filtered(query: Select[Study, Job], where: WorklistFilter) -> Select[Study, Job]:
    if where.date_from is not None:
        query = query.where(Study.first_received_at >= _day_start(where.date_from))
    if where.date_to is not None:
        query = query.where(Study.first_received_at < _day_start(where.date_to + timedelta(days=1)))
    if where.status is not None:
        states = [state for state, status in _JOB_STATUS.items() if status == where.status]
        condition: ColumnElement[bool] = Job.state.in_(states)
        if where.status == "queued":  # no analysis job yet counts as queued
            condition = or_(condition, Job.id.is_(None), Job.state.not_in(list(_JOB_STATUS)))
        query = query.where(condition)
    if where.finding is not None:
        query = query.where(_positive_exists(func.lower(Finding.label) == where.finding.lower()))
    return query


def worklist_row(
    study: Study,
    job: Job | None,
    findings: dict[int, list[FindingRow]],
    results: dict[int, AnalysisResult],
    critical: tuple[str, ...],
) -> WorklistRow:
    status, detail = status_of(job)
    found = findings.get(job.id, []) if job is not None and status == "done" else []
    result = results.get(job.id) if job is not None else None
    return WorklistRow(
        study.study_instance_uid,
        as_utc(study.first_received_at),
        study.accession_number or "",
        study.patient_name or "",
        study.patient_id or "",
        study.study_description or "",
        status,
        detail,
        priority_of(found, critical, result),
        tuple(found[:TOP_FINDINGS]),
        warning_of(result),
        job.id if job is not None else None,
    )


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


@dataclass(frozen=True)
class ResultInfo:
    """The model behind an analysis, as the study page and API show it."""

    job_id: int
    sop_instance_uid: str
    model_name: str
    model_version: str
    weights_sha256: str
    weights_status: str
    thresholds_source: str
    notes: str
    created_at: datetime
    card_sha256: str = ""  # the model card's ("": a result from before model cards)
    runtime: str = ""


@dataclass(frozen=True)
class OutputRow:
    sop_instance_uid: str
    kind: str
    label: str
    state: str
    size_bytes: int


@dataclass(frozen=True)
class PeerDelivery:
    peer: str
    state: str  # the delivery job's state
    delivered: int  # objects the peer accepted
    total: int  # objects to send
    last_status: str  # e.g. "0x0000", or "-"
    detail: str


@dataclass(frozen=True)
class FeedbackRow:
    label: str
    verdict: str
    comment: str
    username: str
    created_at: datetime


@dataclass(frozen=True)
class StudyDetail:
    row: WorklistRow
    patient_sex: str
    patient_age: str
    study_date: str
    instance_count: int
    result: ResultInfo | None
    findings: tuple[FindingRow, ...]
    outputs: tuple[OutputRow, ...]
    deliveries: tuple[PeerDelivery, ...]
    feedback: tuple[FeedbackRow, ...]
    image_purged: bool = False  # the analysed image was removed by the retention purge
    study_time: str = ""  # Study Time (TM) as received, "" when not given
