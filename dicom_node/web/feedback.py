"""Radiologists' feedback on findings: store it (with user and time) and export it as CSV.

Feedback is kept against the analysis it judges (job id, model and weights), so an export
says which model version a radiologist agreed or disagreed with.  The CSV neutralises cells
that a spreadsheet would run as formulas (OWASP "CSV injection").
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.audit.trail import record_audit
from dicom_node.clock import as_utc
from dicom_node.db.models import AnalysisResult, Feedback, Finding, JobState, Study
from dicom_node.errors import InvalidRequestError
from dicom_node.web.queries import current_analysis_jobs
from dicom_node.web.study import load_study

VERDICTS = ("agree", "disagree")
MAX_COMMENT = 2000
CSV_COLUMNS = (
    "created_at",
    "username",
    "study_instance_uid",
    "accession_number",
    "job_id",
    "label",
    "verdict",
    "comment",
    "probability",
    "threshold",
    "ai_decision",
    "model_name",
    "model_version",
    "weights_sha256",
    "weights_status",
)


def add_feedback(
    session: Session,
    *,
    study_instance_uid: str,
    label: str,
    verdict: str,
    comment: str,
    username: str,
    now: datetime,
) -> Feedback:
    """Record agreement or disagreement with ``label`` of the study's current analysis.

    Raises
    ------
    StudyNotFoundError
        The study is not on this node.
    InvalidRequestError
        The study has no finished analysis, the label is not one of its findings, the
        verdict is not agree/disagree, or the comment is too long.
    """
    study = load_study(session, study_instance_uid)
    if verdict not in VERDICTS:
        raise InvalidRequestError(f"verdict must be 'agree' or 'disagree', not {verdict[:20]!r}")
    if len(comment) > MAX_COMMENT:
        raise InvalidRequestError(f"the comment is longer than {MAX_COMMENT} characters")
    job = current_analysis_jobs(session, [study_instance_uid]).get(study_instance_uid)
    if job is None or job.state != JobState.DONE.value:
        raise InvalidRequestError("this study has no AI result to give feedback on")
    found = session.scalar(
        select(Finding.id).where(Finding.job_id == job.id, Finding.label == label)
    )
    if found is None:
        raise InvalidRequestError(f"{label[:64]!r} is not a finding of this study's result")
    row = Feedback(
        study_instance_uid=study_instance_uid,
        job_id=job.id,
        label=label,
        verdict=verdict,
        comment=comment.strip() or None,
        username=username,
        created_at=now,
    )
    session.add(row)
    record_audit(
        session,
        event_type="feedback.recorded",
        now=now,
        username=username,
        study_instance_uid=study_instance_uid,
        patient_id=study.patient_id,
        job_id=job.id,
        label=label,
        verdict=verdict,
    )
    return row


def feedback_csv(session: Session) -> str:
    """Every feedback row with the finding and model it judged, as CSV text (UTF-8)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    query = (
        select(Feedback, Finding, AnalysisResult, Study.accession_number)
        .join(Finding, (Finding.job_id == Feedback.job_id) & (Finding.label == Feedback.label))
        .join(AnalysisResult, AnalysisResult.job_id == Feedback.job_id)
        .join(Study, Study.study_instance_uid == Feedback.study_instance_uid)
        .order_by(Feedback.id)
    )
    for feedback, finding, result, accession in session.execute(query):
        created = as_utc(feedback.created_at).astimezone(UTC)  # PostgreSQL: server zone
        writer.writerow(
            [
                _cell(v)
                for v in (
                    created.isoformat(),
                    feedback.username,
                    feedback.study_instance_uid,
                    accession or "",
                    feedback.job_id,
                    feedback.label,
                    feedback.verdict,
                    feedback.comment or "",
                    f"{finding.probability:.4f}",
                    "" if finding.threshold is None else f"{finding.threshold:.4f}",
                    "positive" if finding.positive else "negative",
                    result.model_name,
                    result.model_version,
                    result.weights_sha256,
                    result.weights_status,
                )
            ]
        )
    return buffer.getvalue()


def _cell(value: object) -> str:
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
