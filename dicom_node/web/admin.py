"""The admin page: jobs and deliveries by state, dead letters with retry, peers with their
last C-ECHO (and a button to C-ECHO now), disk and queue figures, the jobs waiting for disk
space (below ``[storage] min_free_mb``), and the latest audit events.

Only admins reach these routes (a radiologist gets 403).  Retry takes the same path as
``dicom-node jobs retry`` (``operations.retry_job``); every action is audited.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from dicom_node.audit.trail import list_audit, record_audit
from dicom_node.clock import as_utc
from dicom_node.db.models import Delivery, Instance, Job, JobKind, JobState, Output
from dicom_node.errors import NotFoundError
from dicom_node.jobs.queue import WAITING_FOR_SPACE, count_by_state
from dicom_node.ops.actions import echo_peer, last_echoes, record_echo, retry_job
from dicom_node.web import csrf
from dicom_node.web.auth import Principal, admin_principal
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.rendering import render

router = APIRouter(include_in_schema=False)
DEAD_LETTERS_SHOWN = 100
WAITING_SHOWN = 100


@dataclass(frozen=True)
class Figures:
    """Disk and queue numbers for the admin page."""

    disk_free_bytes: int
    disk_total_bytes: int
    instances_bytes: int
    outputs_bytes: int
    queued_analyses: int
    oldest_queued_at: datetime | None
    min_free_mb: int
    waiting_for_space: int


def _waiting_for_space() -> Select[Job]:
    """Queued jobs whose last try found the disk below the reserve (``WAITING_FOR_SPACE``)."""
    return select(Job).where(
        Job.state == JobState.QUEUED.value, Job.last_error.like(f"{WAITING_FOR_SPACE}%")
    )


def waiting_for_space(session: Session, limit: int = WAITING_SHOWN) -> list[Job]:
    """The jobs waiting for disk space, the next to try first."""
    return list(
        session.scalars(_waiting_for_space().order_by(Job.next_attempt_at, Job.id).limit(limit))
    )


def figures(session: Session, storage_root: Path, min_free_mb: int) -> Figures:
    """Free space of the storage root against its reserve, what the node holds, the analysis
    queue, and how many jobs wait for disk space."""
    usage = shutil.disk_usage(storage_root)
    queued = select(Job).where(
        Job.kind == JobKind.ANALYSIS.value,
        Job.state.in_((JobState.QUEUED.value, JobState.FAILED.value)),
    )
    oldest = session.scalar(select(func.min(queued.subquery().c.created_at)))
    return Figures(
        usage.free,
        usage.total,
        int(session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))) or 0),
        int(session.scalar(select(func.coalesce(func.sum(Output.size_bytes), 0))) or 0),
        int(session.scalar(select(func.count()).select_from(queued.subquery())) or 0),
        as_utc(oldest) if oldest else None,
        min_free_mb,
        int(session.scalar(select(func.count()).select_from(_waiting_for_space().subquery())) or 0),
    )


@router.get("/admin")
def admin_page(
    request: Request,
    principal: Principal = Depends(admin_principal),
    context: WebContext = Depends(get_context),
) -> Response:
    with context.transaction() as session:
        jobs = sorted(count_by_state(session).items())
        deliveries = sorted(
            session.execute(select(Delivery.outcome, func.count()).group_by(Delivery.outcome))
            .tuples()
            .all()
        )
        dead = session.scalars(
            select(Job)
            .where(Job.state.in_((JobState.DEAD.value, JobState.FAILED.value)))
            .order_by(Job.id.desc())
            .limit(DEAD_LETTERS_SHOWN)
        ).all()
        echoes = last_echoes(session)
        numbers = figures(
            session, Path(context.settings.storage.root), context.settings.storage.min_free_mb
        )
        waiting = waiting_for_space(session)
        audit = list_audit(session, limit=25)
        record_audit(
            session, event_type="admin.viewed", now=context.clock(), username=principal.username
        )
    return render(
        context,
        request,
        "admin.html",
        principal,
        jobs=jobs,
        deliveries=deliveries,
        dead=dead,
        echoes=echoes,
        peers=context.settings.peers,
        figures=numbers,
        waiting=waiting,
        audit=audit,
    )


@router.post("/admin/jobs/{job_id}/retry")
def retry(
    job_id: int,
    csrf_token: str = Form(""),
    principal: Principal = Depends(admin_principal),
    context: WebContext = Depends(get_context),
) -> Response:
    csrf.require_token(principal.csrf_token, csrf_token)
    now = context.clock()
    with context.transaction() as session:
        message = retry_job(
            session, job_id, now=now, analysis_attempts=context.settings.scheduler.max_attempts
        )
        record_audit(
            session,
            event_type="job.retried",
            now=now,
            username=principal.username,
            job_id=job_id,
            message=message,
        )
    return RedirectResponse("/admin#dead-letters", status_code=303)


@router.post("/admin/peers/{peer_name}/echo")
def echo(
    peer_name: str,
    csrf_token: str = Form(""),
    principal: Principal = Depends(admin_principal),
    context: WebContext = Depends(get_context),
) -> Response:
    csrf.require_token(principal.csrf_token, csrf_token)
    peer = next((p for p in context.settings.peers if p.name == peer_name), None)
    if peer is None:
        raise NotFoundError(f"there is no peer named {peer_name[:64]!r}")
    result = echo_peer(context.settings, peer, now=context.clock())
    with context.transaction() as session:
        record_echo(session, result, username=principal.username)
        record_audit(
            session,
            event_type="peer.echoed",
            now=result.checked_at,
            username=principal.username,
            outcome=result.outcome,
            peer=peer.name,
            status=result.detail,
        )
    return RedirectResponse("/admin#peers", status_code=303)
