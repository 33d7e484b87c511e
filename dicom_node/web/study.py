"""One study's full picture for the study page and the API: result, findings, outputs,
deliveries per peer and feedback.  Raises :class:`StudyNotFoundError` for a study the node
does not hold."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.audit.trail import record_audit
from dicom_node.clock import as_utc
from dicom_node.db.models import (
    AnalysisResult,
    Delivery,
    Feedback,
    Instance,
    Job,
    JobKind,
    Output,
    OutputState,
    Study,
)
from dicom_node.errors import StudyNotFoundError
from dicom_node.scu.send import DeliveryOutcome
from dicom_node.uids import is_valid_uid
from dicom_node.web.auth import Principal
from dicom_node.web.context import WebContext
from dicom_node.web.queries import (
    FeedbackRow,
    OutputRow,
    PeerDelivery,
    ResultInfo,
    StudyDetail,
    current_analysis_jobs,
    finding_rows,
    worklist_row,
)


def load_study(session: Session, study_instance_uid: str) -> Study:
    """The study row, or :class:`StudyNotFoundError` (also for a malformed UID)."""
    study = session.get(Study, study_instance_uid) if is_valid_uid(study_instance_uid) else None
    if study is None:
        raise StudyNotFoundError(f"study {study_instance_uid[:64]!r} is not on this node")
    return study


def output_download(
    context: WebContext,
    principal: Principal,
    study_instance_uid: str,
    sop_instance_uid: str,
    via: str,
) -> FileResponse:
    """One result object of the study as a Part 10 file, audited as ``output.downloaded``.

    The file's path comes only from the outputs table, never from the URL.
    """
    with context.transaction() as session:
        study = load_study(session, study_instance_uid)
        output = session.scalar(
            select(Output).where(
                Output.sop_instance_uid == sop_instance_uid,
                Output.study_instance_uid == study_instance_uid,
            )
        )
        if output is None:
            raise StudyNotFoundError("this result object is not part of the study")
        record_audit(
            session,
            event_type="output.downloaded",
            now=context.clock(),
            username=principal.username,
            study_instance_uid=study_instance_uid,
            patient_id=study.patient_id,
            sop_instance_uid=sop_instance_uid,
            kind=output.kind,
            via=via,
        )
    root = Path(context.settings.storage.root).resolve()
    path = (root / output.path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise StudyNotFoundError("the result file is no longer stored on this node")
    return FileResponse(
        path, media_type="application/dicom", filename=f"{output.kind}-{sop_instance_uid}.dcm"
    )


def viewer_link(template: str, study_instance_uid: str) -> str:
    """``[web] viewer_url`` for one study ({study_instance_uid} replaced, URL-quoted), or ""
    when no viewer is configured: the study page's "Open in viewer"."""
    if not template:
        return ""
    return template.replace("{study_instance_uid}", quote(study_instance_uid, safe=""))


def view_study(
    context: WebContext, principal: Principal, study_instance_uid: str, via: str
) -> StudyDetail:
    """The study's detail for ``principal``, audited as ``study.viewed`` in the same transaction."""
    with context.transaction() as session:
        detail = study_detail(
            session, study_instance_uid, critical=context.settings.web.critical_findings
        )
        record_audit(
            session,
            event_type="study.viewed",
            now=context.clock(),
            username=principal.username,
            study_instance_uid=study_instance_uid,
            patient_id=detail.row.patient_id or None,
            via=via,
        )
    return detail


def study_detail(
    session: Session, study_instance_uid: str, *, critical: tuple[str, ...]
) -> StudyDetail:
    """Everything the study page shows about one study."""
    study = load_study(session, study_instance_uid)
    job = current_analysis_jobs(session, [study_instance_uid]).get(study_instance_uid)
    result = session.get(AnalysisResult, job.id) if job is not None else None
    findings = finding_rows(session, [job.id]) if result is not None and job is not None else {}
    row = worklist_row(study, job, findings, {result.job_id: result} if result else {}, critical)
    return StudyDetail(
        row=row,
        patient_sex=study.patient_sex or "",
        patient_age=study.patient_age or "",
        study_date=study.study_date or "",
        instance_count=study.instance_count,
        result=_result_info(result),
        findings=tuple(findings.get(job.id, []) if job else []),
        outputs=_outputs(session, job),
        deliveries=_deliveries(session, job),
        feedback=_feedback(session, study_instance_uid),
        image_purged=_image_purged(session, result),
        study_time=study.study_time or "",
    )


def _image_purged(session: Session, result: AnalysisResult | None) -> bool:
    """Whether the retention purge removed the analysed image (the page says so, no picture)."""
    if result is None:
        return False
    instance = session.get(Instance, result.sop_instance_uid)
    return instance is not None and instance.purged_at is not None


def _result_info(result: AnalysisResult | None) -> ResultInfo | None:
    if result is None:
        return None
    return ResultInfo(
        result.job_id,
        result.sop_instance_uid,
        result.model_name,
        result.model_version,
        result.weights_sha256,
        result.weights_status,
        result.thresholds_source,
        result.notes or "",
        as_utc(result.created_at),
        result.card_sha256 or "",
        result.runtime or "",
    )


def _outputs(session: Session, job: Job | None) -> tuple[OutputRow, ...]:
    if job is None:
        return ()
    rows = session.scalars(
        select(Output)
        .where(Output.job_id == job.id, Output.state == OutputState.CURRENT.value)
        .order_by(Output.kind.desc(), Output.label)
    )
    return tuple(
        OutputRow(o.sop_instance_uid, o.kind, o.label or "", o.state, o.size_bytes) for o in rows
    )


def _deliveries(session: Session, job: Job | None) -> tuple[PeerDelivery, ...]:
    if job is None:
        return ()
    outputs = [
        o.sop_instance_uid
        for o in session.scalars(
            select(Output).where(Output.job_id == job.id, Output.state == OutputState.CURRENT.value)
        )
    ]
    ledger = (
        list(session.scalars(select(Delivery).where(Delivery.sop_instance_uid.in_(outputs))))
        if outputs
        else []
    )
    result = []
    for delivery_job in session.scalars(
        select(Job)
        .where(
            Job.kind == JobKind.DELIVERY.value,
            Job.study_instance_uid == job.study_instance_uid,
            Job.study_revision == job.study_revision,
        )
        .order_by(Job.target)
    ):
        rows = [r for r in ledger if r.peer == delivery_job.target]
        last = max(rows, key=lambda r: as_utc(r.updated_at), default=None)
        code = f"0x{last.status_code:04X}" if last and last.status_code is not None else "-"
        result.append(
            PeerDelivery(
                delivery_job.target,
                delivery_job.state,
                sum(r.outcome == DeliveryOutcome.DELIVERED for r in rows),
                len(outputs),
                code,
                delivery_job.last_error or (last.detail if last else "") or "",
            )
        )
    return tuple(result)


def _feedback(session: Session, study_instance_uid: str) -> tuple[FeedbackRow, ...]:
    rows = session.scalars(
        select(Feedback)
        .where(Feedback.study_instance_uid == study_instance_uid)
        .order_by(Feedback.id.desc())
    )
    return tuple(
        FeedbackRow(f.label, f.verdict, f.comment or "", f.username, as_utc(f.created_at))
        for f in rows
    )
