"""The JSON API for RIS integration: the worklist, one study's results, and feedback.

Every route needs a bearer token (``dicom-node users token NAME``) or a browser session;
posting feedback needs a token with the ``write`` scope (or a session plus its CSRF header).
The schema is served at ``/openapi.json`` (public: it holds no data).
"""

from __future__ import annotations

from datetime import date
from typing import Any, Literal, cast

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse
from sqlalchemy import select

from dicom_node.audit.trail import record_audit
from dicom_node.clock import as_utc
from dicom_node.db.models import Feedback
from dicom_node.web.auth import Principal, api_principal, api_writer
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.feedback import add_feedback
from dicom_node.web.queries import (
    FeedbackRow,
    FindingRow,
    WorklistFilter,
    WorklistRow,
    finding_labels,
    known_label,
    worklist,
)
from dicom_node.web.schemas import (
    DeliveryOut,
    ErrorOut,
    FeedbackIn,
    FeedbackOut,
    FindingOut,
    ModelOut,
    OutputOut,
    StudyResultOut,
    WorklistItemOut,
    WorklistOut,
)
from dicom_node.web.study import load_study, output_download, view_study

# FastAPI types ``responses`` as dict[int | str, dict[str, Any]]; dict is invariant.
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no valid token or session"},
    403: {"model": ErrorOut, "description": "the token or user may not do this"},
    422: {"model": ErrorOut, "description": "a parameter is not valid"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "the study is not on this node"}
}
router = APIRouter(prefix="/api/v1", tags=["AI results"], responses=ERRORS)
Status = Literal["queued", "analysing", "done", "not_analysed", "failed"]
Priority = Literal["critical", "abnormal", "routine"]
Verdict = Literal["agree", "disagree"]


def finding_out(finding: FindingRow) -> FindingOut:
    return FindingOut(
        label=finding.label,
        probability=finding.probability,
        threshold=finding.threshold,
        decision="positive" if finding.positive else "negative",
        boxes=[list(b) for b in finding.boxes],
    )


def item_out(row: WorklistRow) -> WorklistItemOut:
    return WorklistItemOut(
        study_instance_uid=row.study_instance_uid,
        received_at=row.received_at,
        accession_number=row.accession_number,
        patient_name=row.patient_name,
        patient_id=row.patient_id,
        status=cast(Status, row.status),  # one of queries.STATUSES; pydantic validates
        status_detail=row.status_detail,
        priority=cast(Priority, row.priority),  # one of queries.PRIORITIES
        top_findings=[finding_out(f) for f in row.top_findings],
        model_warning=row.model_warning,
    )


def feedback_out(study_instance_uid: str, row: FeedbackRow) -> FeedbackOut:
    return FeedbackOut(
        study_instance_uid=study_instance_uid,
        label=row.label,
        verdict=cast(Verdict, row.verdict),  # stored from FeedbackIn; pydantic validates
        comment=row.comment,
        username=row.username,
        created_at=row.created_at,
    )


@router.get("/worklist", response_model=WorklistOut, summary="The AI worklist in priority order")
def api_worklist(
    status: Status | None = None,
    finding: str | None = Query(
        None,
        max_length=64,
        description=("a finding label of the configured model, e.g. Pneumothorax"),
    ),
    date_from: date | None = None,
    date_to: date | None = None,
    principal: Principal = Depends(api_principal),
    context: WebContext = Depends(get_context),
) -> WorklistOut:
    """Studies with their AI status, top findings and priority (critical findings first)."""
    labels = finding_labels(context.settings.model.name, context.settings.models_dir)
    where = WorklistFilter(status, known_label(finding, labels), date_from, date_to)
    with context.transaction() as session:
        rows = worklist(session, critical=context.settings.web.critical_findings, where=where)
        record_audit(
            session,
            event_type="worklist.viewed",
            now=context.clock(),
            username=principal.username,
            rows=len(rows),
            via="api",
        )
    return WorklistOut(items=[item_out(row) for row in rows])


@router.get(
    "/studies/{study_instance_uid}",
    response_model=StudyResultOut,
    responses=NOT_FOUND,
    summary="One study's AI result",
)
def api_study(
    study_instance_uid: str,
    principal: Principal = Depends(api_principal),
    context: WebContext = Depends(get_context),
) -> StudyResultOut:
    """Findings with probability, threshold and decision; the model; outputs; deliveries."""
    detail = view_study(context, principal, study_instance_uid, via="api")
    result = detail.result
    model = (
        None
        if result is None
        else ModelOut(
            name=result.model_name,
            version=result.model_version,
            weights_sha256=result.weights_sha256,
            weights_status=result.weights_status,
            thresholds_source=result.thresholds_source,
            warning=detail.row.model_warning,
            card_sha256=result.card_sha256,
            runtime=result.runtime,
        )
    )
    return StudyResultOut(
        study=item_out(detail.row),
        analysed_sop_instance_uid=result.sop_instance_uid if result else None,
        model=model,
        notes=result.notes if result else detail.row.status_detail,
        findings=[finding_out(f) for f in detail.findings],
        outputs=[
            OutputOut(
                sop_instance_uid=o.sop_instance_uid,
                kind=o.kind,
                label=o.label,
                download_url=f"/api/v1/studies/{study_instance_uid}/outputs/{o.sop_instance_uid}",
            )
            for o in detail.outputs
        ],
        deliveries=[
            DeliveryOut(
                peer=d.peer,
                state=d.state,
                delivered=d.delivered,
                total=d.total,
                last_status=d.last_status,
            )
            for d in detail.deliveries
        ],
        feedback=[feedback_out(study_instance_uid, f) for f in detail.feedback],
    )


@router.get(
    "/studies/{study_instance_uid}/outputs/{sop_instance_uid}",
    response_class=FileResponse,
    summary="One AI result object (SR, SC...) as DICOM",
    responses={
        **NOT_FOUND,
        200: {
            "content": {"application/dicom": {}},
            "description": "the DICOM Part 10 file",
        },
    },
)
def api_download_output(
    study_instance_uid: str,
    sop_instance_uid: str,
    principal: Principal = Depends(api_principal),
    context: WebContext = Depends(get_context),
) -> FileResponse:
    """The file behind an output's ``download_url``; each download is audited."""
    return output_download(context, principal, study_instance_uid, sop_instance_uid, "api")


@router.get(
    "/studies/{study_instance_uid}/feedback",
    response_model=list[FeedbackOut],
    responses=NOT_FOUND,
    summary="Radiologists' feedback on one study",
)
def api_study_feedback(
    study_instance_uid: str,
    principal: Principal = Depends(api_principal),
    context: WebContext = Depends(get_context),
) -> list[FeedbackOut]:
    with context.transaction() as session:
        load_study(session, study_instance_uid)
        rows = session.scalars(
            select(Feedback)
            .where(Feedback.study_instance_uid == study_instance_uid)
            .order_by(Feedback.id)
        ).all()
        return [_feedback_row(row) for row in rows]


@router.post(
    "/studies/{study_instance_uid}/feedback",
    response_model=FeedbackOut,
    status_code=201,
    responses=NOT_FOUND,
    summary="Agree or disagree with a finding",
)
def api_post_feedback(
    study_instance_uid: str,
    body: FeedbackIn,
    principal: Principal = Depends(api_writer),
    context: WebContext = Depends(get_context),
) -> FeedbackOut:
    """Needs a token with the write scope (``users token NAME --scope write``)."""
    with context.transaction() as session:
        row = add_feedback(
            session,
            study_instance_uid=study_instance_uid,
            label=body.label,
            verdict=body.verdict,
            comment=body.comment,
            username=principal.username,
            now=context.clock(),
        )
        session.flush()
        return _feedback_row(row)


@router.get("/feedback", response_model=list[FeedbackOut], summary="All feedback, oldest first")
def api_feedback(
    principal: Principal = Depends(api_principal), context: WebContext = Depends(get_context)
) -> list[FeedbackOut]:
    with context.transaction() as session:
        rows = session.scalars(select(Feedback).order_by(Feedback.id).limit(10000)).all()
        record_audit(
            session,
            event_type="feedback.exported",
            now=context.clock(),
            username=principal.username,
            via="api",
            rows=len(rows),
        )
        return [_feedback_row(row) for row in rows]


def _feedback_row(row: Feedback) -> FeedbackOut:
    return FeedbackOut(
        study_instance_uid=row.study_instance_uid,
        label=row.label,
        verdict=cast(Verdict, row.verdict),  # stored from FeedbackIn; pydantic validates
        comment=row.comment or "",
        username=row.username,
        created_at=as_utc(row.created_at),
    )
