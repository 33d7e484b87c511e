"""Operator actions shared by the CLI and the web admin page: retry a job, C-ECHO a peer.

Both front ends call these functions, so ``dicom-node jobs retry ID`` and the admin page's
retry button take exactly the same path (``jobs.queue.requeue``, plus re-opening the objects a
peer rejected for a delivery job).  The C-ECHO result is stored so the admin page can show each
peer's last answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.config.settings import PeerSettings, Settings
from dicom_node.db.models import Job, JobKind, PeerEcho
from dicom_node.jobs.delivery import reopen_rejected
from dicom_node.jobs.queue import DELIVERY_MAX_ATTEMPTS, requeue
from dicom_node.scu.echo import echo
from dicom_node.scu.stow import dicomweb_echo

ECHO_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class EchoResult:
    """What a peer answered to C-ECHO: success, or failure with why."""

    peer: str
    outcome: str  # success or failure
    status_code: int | None  # the C-ECHO-RSP status, None when there was no answer
    detail: str
    checked_at: datetime


def retry_job(session: Session, job_id: int, *, now: datetime, analysis_attempts: int) -> str:
    """Put a dead or failed job back in the queue; returns the sentence to show the operator.

    Raises
    ------
    JobNotFoundError, JobStateError
        From ``requeue``: no such job, or it is not dead or failed.
    """
    job = session.get(Job, job_id)
    if job is not None and job.kind == JobKind.DELIVERY.value:
        reopened = reopen_rejected(session, job, now=now)
        requeue(session, job_id, now=now, attempts=DELIVERY_MAX_ATTEMPTS, restart_clock=True)
        return f"delivery job {job_id} re-queued ({reopened} rejected object(s) will be sent again)"
    requeue(session, job_id, now=now, attempts=analysis_attempts)
    return f"job {job_id} re-queued"


def echo_peer(
    settings: Settings, peer: PeerSettings, *, now: datetime, timeout: float = ECHO_TIMEOUT_SECONDS
) -> EchoResult:
    """C-ECHO ``peer`` from the node's AE title (PS3.7 9.1.5) and report what came back.

    A peer with ``tls = true`` is echoed over DICOM TLS, exactly as results are sent to it
    (:mod:`dicom_node.scu.echo`).  A peer with a ``dicomweb_url`` (results go by STOW-RS) is
    asked a QIDO-RS search instead, with the same credentials (:mod:`dicom_node.scu.stow`).
    """
    if peer.dicomweb_url:
        answer = dicomweb_echo(peer, timeout=timeout, tls=settings.tls)
    else:
        answer = echo(
            peer, calling_ae_title=settings.node.ae_title, tls=settings.tls, timeout=timeout
        )
    return EchoResult(
        peer.name,
        "success" if answer.succeeded else "failure",
        answer.status_code,
        answer.detail,
        now,
    )


def record_echo(session: Session, result: EchoResult, *, username: str | None) -> None:
    """Store one C-ECHO result (the admin page shows each peer's latest)."""
    session.add(
        PeerEcho(
            peer=result.peer,
            checked_at=result.checked_at,
            outcome=result.outcome,
            status_code=result.status_code,
            detail=result.detail,
            username=username,
        )
    )


def last_echoes(session: Session) -> dict[str, PeerEcho]:
    """Each peer's most recent C-ECHO result, by peer name."""
    newest = select(func.max(PeerEcho.id)).group_by(PeerEcho.peer)
    return {
        row.peer: row for row in session.scalars(select(PeerEcho).where(PeerEcho.id.in_(newest)))
    }
