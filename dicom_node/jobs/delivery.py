"""The delivery worker: send a study revision's outputs to one peer, keep the ledger.

A delivery job is (study, revision, peer).  Each attempt sends the outputs the ledger does
not yet show as delivered or rejected, in batches of ``[delivery] batch_size`` per
association, then records every answer and the job's next state in one transaction fenced on
the lease.  Transient failures retry with doubling backoff (capped) until
``give_up_after_seconds`` after the job was queued; permanent ones are not retried, and the
job ends dead naming them once nothing transient remains.  Delivery never re-runs the model:
it sends the files the analysis wrote, under the UIDs it fixed.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import structlog
from sqlalchemy import case, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.atna import record_instances_sent
from dicom_node.clock import utcnow
from dicom_node.config.settings import PeerSettings, Settings
from dicom_node.db.models import Delivery, Job, JobKind, Output, OutputState
from dicom_node.db.session import session_scope
from dicom_node.errors import DeliveryError, JobLeaseLostError, TransientDeliveryError
from dicom_node.events import record_event
from dicom_node.jobs.queue import Lease, claim_jobs, complete, extend_lease, fail
from dicom_node.jobs.worker import default_worker_id, work_until
from dicom_node.ops.metrics.collect import NodeMetrics
from dicom_node.scu.send import DELIVERED, FAILED, REJECTED, OutgoingFile, SendResult, send_files

log = structlog.get_logger(__name__)


def pending_outputs(session: Session, lease: Lease, peer: PeerSettings) -> list[Output]:
    """This revision's current outputs the peer has neither accepted nor refused for good."""
    settled = select(Delivery.sop_instance_uid).where(
        Delivery.peer == peer.name, Delivery.outcome.in_((DELIVERED, REJECTED)))
    query = select(Output).where(
        Output.study_instance_uid == lease.study_instance_uid,
        Output.study_revision == lease.study_revision,
        Output.state == OutputState.CURRENT.value,
        Output.sop_instance_uid.not_in(settled)).order_by(
        # The rejection note goes last: the old results are withdrawn once the new ones are in.
        case((Output.kind == "kos", 1), else_=0), Output.kind, Output.sop_instance_uid)
    if not peer.withdraw_superseded:
        query = query.where(Output.kind != "kos")
    return list(session.scalars(query))


def record_results(session: Session, lease: Lease, results: Sequence[SendResult], *,
                   now: datetime) -> None:
    """Write one ledger row per (output, peer): the peer's latest answer."""
    for result in results:
        row = session.scalars(select(Delivery).where(
            Delivery.sop_instance_uid == result.sop_instance_uid,
            Delivery.peer == lease.target)).one_or_none()
        if row is None:
            row = Delivery(sop_instance_uid=result.sop_instance_uid, peer=lease.target,
                           attempts=0)
            session.add(row)
        row.job_id, row.outcome, row.status_code = lease.job_id, result.outcome, result.status_code
        row.detail, row.attempts, row.updated_at = result.detail, row.attempts + 1, now
        if result.outcome == DELIVERED:
            row.delivered_at = now


def reopen_rejected(session: Session, job: Job, *, now: datetime) -> int:
    """Before a manual retry of a delivery: let the rejected outputs be sent once more."""
    outputs = select(Output.sop_instance_uid).where(
        Output.study_instance_uid == job.study_instance_uid,
        Output.study_revision == job.study_revision)
    return session.execute(update(Delivery).where(
        Delivery.peer == job.target, Delivery.outcome == REJECTED,
        Delivery.sop_instance_uid.in_(outputs)).values(outcome=FAILED, updated_at=now)).rowcount


class DeliveryWorker:
    """Claims delivery jobs and sends their outputs, one job at a time."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session],
                 worker_id: str | None = None, poll_seconds: float = 0.5,
                 metrics: NodeMetrics | None = None) -> None:
        self.settings, self.factory = settings, factory
        self.metrics = metrics or NodeMetrics()
        self.worker_id = (worker_id or default_worker_id()) + ":delivery"
        self.poll_seconds = poll_seconds
        self.wake = threading.Event()
        self.root = Path(settings.storage.root)
        self.peers = {peer.name: peer for peer in settings.peers}

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; never dies on a job's or the database's error."""
        with structlog.contextvars.bound_contextvars(worker_id=self.worker_id):
            work_until(stop, self.wake, self.poll_seconds, self.run_once, "delivery")

    def run_once(self) -> int:
        """Claim and deliver one job; returns how many were claimed (0 or 1)."""
        with session_scope(self.factory) as session:
            leases = claim_jobs(session, kind=JobKind.DELIVERY.value, worker_id=self.worker_id,
                                limit=1, now=utcnow(),
                                lease_seconds=self.settings.scheduler.lease_seconds)
        for lease in leases:
            try:
                self.deliver(lease)
            except JobLeaseLostError:
                log.warning("job.lease_lost", job_id=lease.job_id, attempt=lease.attempt)
        return len(leases)

    def deliver(self, lease: Lease) -> str:
        """One attempt at a delivery job; returns the job's new state."""
        peer = self.peers.get(lease.target)
        if peer is None or not peer.send_results:
            return self._finish(lease, [], DeliveryError(
                f"peer {lease.target!r} is no longer configured to receive results"))
        with session_scope(self.factory) as session:
            files = [OutgoingFile(o.sop_class_uid, o.sop_instance_uid, self.root / o.path)
                     for o in pending_outputs(session, lease, peer)]
        results, error = self._send(lease, files, peer)
        try:
            return self._finish(lease, results, error)
        finally:  # instances.sent: what went out is true whoever holds the lease now
            record_instances_sent(
                self.factory, study_instance_uid=lease.study_instance_uid, peer=peer,
                peer_name=lease.target, job_id=lease.job_id, files=len(files), results=results,
                error=error, batch_size=self.settings.delivery.batch_size)

    def _send(self, lease: Lease, files: list[OutgoingFile], peer: PeerSettings
              ) -> tuple[list[SendResult], DeliveryError | None]:
        results: list[SendResult] = []
        size = self.settings.delivery.batch_size
        for start in range(0, len(files), size):
            if start:
                with session_scope(self.factory) as session:
                    extend_lease(session, lease, now=utcnow(),
                                 lease_seconds=self.settings.scheduler.lease_seconds)
            try:
                results += send_files(files[start:start + size], peer,
                                      calling_ae_title=self.settings.node.ae_title,
                                      timeout=self.settings.delivery.timeout_seconds,
                                      tls=self.settings.tls)
            except DeliveryError as exc:
                return results, exc
            except Exception as exc:  # a bug or an odd peer: retried, and given up in time
                log.error("delivery.send_error", job_id=lease.job_id,
                          error_type=type(exc).__name__,
                          stack="".join(traceback.format_tb(exc.__traceback__)))
                return results, TransientDeliveryError(
                    f"internal error while sending ({type(exc).__name__})")
        return results, None

    def _finish(self, lease: Lease, results: list[SendResult], error: DeliveryError | None) -> str:
        now = utcnow()
        # What the peer answered is true whoever holds the lease now: the ledger is written
        # first, unfenced; then the job's next state, fenced on the lease.
        with session_scope(self.factory) as session:
            record_results(session, lease, results, now=now)
        with session_scope(self.factory) as session:
            state = self._next_state(session, lease, results, error, now)
        self.metrics.delivery_attempt(self.factory, lease, [r.outcome for r in results],
                                      error is not None, state, now)
        log.info("job.finished", job_id=lease.job_id, kind="delivery", outcome=state,
                 peer=lease.target, sent=len(results),
                 delivered=sum(r.outcome == DELIVERED for r in results),
                 error=str(error) if error else None)
        return state

    def _next_state(self, session: Session, lease: Lease, results: list[SendResult],
                    error: DeliveryError | None, now: datetime) -> str:
        transient = [r for r in results if r.outcome == FAILED]
        rejected = [r for r in results if r.outcome == REJECTED]
        for result in rejected:
            record_event(session, "delivery.rejected", now=now, level="error",
                         study_instance_uid=lease.study_instance_uid, job_id=lease.job_id,
                         sop_instance_uid=result.sop_instance_uid, peer=lease.target,
                         detail=result.detail)
        if error is None and not transient and not rejected and not _earlier_rejections(
                session, lease):
            complete(session, lease, now=now)
            return "done"
        if error is not None and not error.retryable:
            message = str(error)
        elif error is not None or transient:
            message = str(error) if error else _summary(transient, "not yet accepted")
            return self._retry(session, lease, message, now)
        else:
            message = _summary(rejected, "rejected") if rejected else \
                "outputs were rejected by the peer in an earlier attempt"
        return fail(session, lease, error=message, retryable=False, now=now,
                    backoff_seconds=self.settings.delivery.backoff_seconds)

    def _retry(self, session: Session, lease: Lease, message: str, now: datetime) -> str:
        delivery = self.settings.delivery
        expired = lease.created_at is not None and \
            (now - lease.created_at).total_seconds() >= delivery.give_up_after_seconds
        if expired:
            message += f" (gave up after {delivery.give_up_after_seconds:g} s)"
        return fail(session, lease, error=message, retryable=not expired, now=now,
                    backoff_seconds=delivery.backoff_seconds,
                    max_backoff_seconds=delivery.max_backoff_seconds)


def _earlier_rejections(session: Session, lease: Lease) -> bool:
    outputs = select(Output.sop_instance_uid).where(
        Output.study_instance_uid == lease.study_instance_uid,
        Output.study_revision == lease.study_revision,
        Output.state == OutputState.CURRENT.value)
    return session.scalars(select(Delivery.id).where(
        Delivery.peer == lease.target, Delivery.outcome == REJECTED,
        Delivery.sop_instance_uid.in_(outputs)).limit(1)).first() is not None


def _summary(results: Sequence[SendResult], what: str) -> str:
    details = sorted({r.detail for r in results})
    return f"{len(results)} object(s) {what}: {', '.join(details)}"

