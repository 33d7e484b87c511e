"""Browser pages for radiologists: log-in and log-out, the worklist, the study page with its
heatmaps and downloads, feedback and its CSV export.

URLs carry only UIDs, finding labels, dates and statuses, never patient data, because the
access log prints them.  Every study view and download is written to the audit trail.
"""

from __future__ import annotations

from datetime import date
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from dicom_node.audit.trail import record_audit
from dicom_node.errors import InvalidInstanceError, InvalidRequestError, StudyNotFoundError
from dicom_node.web import csrf
from dicom_node.web.auth import (
    AUTO_REFRESH,
    SESSION_COOKIE,
    Principal,
    end_session,
    is_auto_refresh,
    page_principal,
    session_principal,
    set_session_cookie,
)
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.feedback import add_feedback, feedback_csv
from dicom_node.web.heatmaps import picture_of, render_png
from dicom_node.web.login import LoginAttempt, attempt_login
from dicom_node.web.queries import (
    STATUS_TEXT,
    STATUSES,
    WorklistFilter,
    finding_labels,
    known_label,
    worklist,
)
from dicom_node.web.rendering import render
from dicom_node.web.study import load_study, output_download, view_study, viewer_link

router = APIRouter(include_in_schema=False)


def parse_filter(
    status: str, finding: str, date_from: str, date_to: str, labels: tuple[str, ...]
) -> WorklistFilter:
    """The worklist filter from query strings ("" means any); InvalidRequestError if bad."""
    if status and status not in STATUSES:
        raise InvalidRequestError(f"status must be one of {', '.join(STATUSES)}")
    return WorklistFilter(
        status or None,
        known_label(finding, labels),
        _date(date_from, "date_from"),
        _date(date_to, "date_to"),
    )


def _date(text: str, name: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidRequestError(f"{name} must be a date YYYY-MM-DD") from None


def safe_next(target: str) -> str:
    """Only a local path may be the page after log-in (no open redirect)."""
    return target if target.startswith("/") and not target.startswith("//") else "/worklist"


@router.get("/")
def home(principal: Principal = Depends(page_principal)) -> RedirectResponse:
    return RedirectResponse("/worklist", status_code=303)


@router.get("/login")
def login_form(
    request: Request, next: str = "/worklist", context: WebContext = Depends(get_context)
) -> Response:
    if session_principal(request, context) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    with context.transaction() as session:  # the pre-session the form's POST must bring back
        cookie, token = csrf.issue_login_form(session, now=context.clock())
    response = render(
        context, request, "login.html", None, next=safe_next(next), login_csrf=token, error=""
    )
    response.set_cookie(
        csrf.LOGIN_COOKIE,
        cookie,
        httponly=True,
        samesite="strict",
        secure=context.settings.web.secure_cookies,
        path="/login",
        max_age=int(csrf.LOGIN_FORM_LIFETIME.total_seconds()),
    )
    return response


@router.post("/login")
async def login(
    request: Request,
    username: str = Form(""),
    password: str = Form(""),
    csrf_token: str = Form(""),
    next: str = Form("/worklist"),
    context: WebContext = Depends(get_context),
) -> Response:
    attempt = LoginAttempt(
        username[:64],
        password,
        request.client.host if request.client else "",
        request.cookies.get(csrf.LOGIN_COOKIE),
        csrf_token,
        request.cookies.get(SESSION_COOKIE),
    )
    outcome = await attempt_login(context, attempt, request.app.state.login_limiter)
    if outcome.session_cookie is None:
        wait = outcome.retry_after_seconds
        failed = render(
            context,
            request,
            "login.html",
            None,
            status_code=429 if wait else 401,
            next=safe_next(next),
            login_csrf=csrf_token,
            error=(
                f"Too many failed log-ins: wait {wait} seconds, then try again."
                if wait
                else "The user name or password is wrong."
            ),
        )
        if wait:
            failed.headers["Retry-After"] = str(wait)  # RFC 6585 4: 429 Too Many Requests
        return failed
    response = RedirectResponse(safe_next(next), status_code=303)
    set_session_cookie(response, outcome.session_cookie, context.settings.web)
    response.delete_cookie(csrf.LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(
    request: Request,
    csrf_token: str = Form(""),
    principal: Principal = Depends(page_principal),
    context: WebContext = Depends(get_context),
) -> Response:
    csrf.require_token(principal.csrf_token, csrf_token)
    with context.transaction() as session:
        end_session(session, request.cookies.get(SESSION_COOKIE))
        record_audit(
            session, event_type="user.logout", now=context.clock(), username=principal.username
        )
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/worklist")
def worklist_page(
    request: Request,
    status: str = "",
    finding: str = "",
    date_from: str = "",
    date_to: str = "",
    principal: Principal = Depends(page_principal),
    context: WebContext = Depends(get_context),
) -> Response:
    labels = finding_labels(context.settings.model.name, context.settings.models_dir)
    where = parse_filter(status, finding, date_from, date_to, labels)
    with context.transaction() as session:
        rows = worklist(session, critical=context.settings.web.critical_findings, where=where)
        if not is_auto_refresh(request):  # the self-refresh is not a person looking
            record_audit(
                session,
                event_type="worklist.viewed",
                now=context.clock(),
                username=principal.username,
                rows=len(rows),
            )
    return render(
        context,
        request,
        "worklist.html",
        principal,
        rows=rows,
        where=where,
        statuses=STATUSES,
        status_text=STATUS_TEXT,
        labels=labels,
        refresh_url=_refresh_url(request),
    )


def _refresh_url(request: Request) -> str:
    """This worklist URL (same filters) marked as the automatic refresh."""
    params = [(k, v) for k, v in request.query_params.multi_items() if k != AUTO_REFRESH]
    return "/worklist?" + urlencode([*params, (AUTO_REFRESH, "1")])


@router.get("/studies/{study_instance_uid}")
def study_page(
    request: Request,
    study_instance_uid: str,
    principal: Principal = Depends(page_principal),
    context: WebContext = Depends(get_context),
) -> Response:
    detail = view_study(context, principal, study_instance_uid, via="page")
    heatmaps = [f for f in detail.findings if f.has_heatmap]
    shown = next((f.label for f in heatmaps if f.positive), heatmaps[0].label if heatmaps else None)
    return render(
        context,
        request,
        "study.html",
        principal,
        detail=detail,
        shown=shown,
        status_text=STATUS_TEXT,
        viewer_link=viewer_link(context.settings.web.viewer_url, study_instance_uid),
    )


@router.get("/studies/{study_instance_uid}/image.png")
def study_image(
    study_instance_uid: str,
    finding: str | None = Query(None, max_length=64),
    principal: Principal = Depends(page_principal),
    context: WebContext = Depends(get_context),
) -> Response:
    with context.transaction() as session:
        load_study(session, study_instance_uid)
        picture = picture_of(session, context.settings, study_instance_uid, finding or None)
    try:
        png = render_png(context.settings, picture)
    except (InvalidInstanceError, OSError):
        if picture.image_path.is_file():
            raise
        # Gone before or while it was read (removed by hand, or purged by retention just now).
        raise StudyNotFoundError("the analysed image is no longer stored on this node") from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/studies/{study_instance_uid}/outputs/{sop_instance_uid}.dcm")
def download_output(
    study_instance_uid: str,
    sop_instance_uid: str,
    principal: Principal = Depends(page_principal),
    context: WebContext = Depends(get_context),
) -> Response:
    return output_download(context, principal, study_instance_uid, sop_instance_uid, "page")


@router.post("/studies/{study_instance_uid}/feedback")
def post_feedback(
    study_instance_uid: str,
    label: str = Form(""),
    verdict: str = Form(""),
    comment: str = Form(""),
    csrf_token: str = Form(""),
    principal: Principal = Depends(page_principal),
    context: WebContext = Depends(get_context),
) -> Response:
    csrf.require_token(principal.csrf_token, csrf_token)
    with context.transaction() as session:
        add_feedback(
            session,
            study_instance_uid=study_instance_uid,
            label=label,
            verdict=verdict,
            comment=comment,
            username=principal.username,
            now=context.clock(),
        )
    return RedirectResponse(f"/studies/{study_instance_uid}#feedback", status_code=303)


@router.get("/feedback.csv")
def export_feedback(
    principal: Principal = Depends(page_principal), context: WebContext = Depends(get_context)
) -> Response:
    with context.transaction() as session:
        text = feedback_csv(session)
        record_audit(
            session,
            event_type="feedback.exported",
            now=context.clock(),
            username=principal.username,
        )
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="ai-feedback.csv"'},
    )
