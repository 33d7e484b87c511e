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

import traceback
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

import structlog
from sqlalchemy import CursorResult, case, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.atna import record_instances_sent
from dicom_node.clock import utcnow
from dicom_node.config.settings import PeerSettings, Settings
from dicom_node.db.models import Delivery, Job, JobKind, JobState, Output, OutputState
from dicom_node.db.session import session_scope
from dicom_node.errors import DeliveryError, JobLeaseLostError, TransientDeliveryError
from dicom_node.events import record_event
from dicom_node.jobs.loop import (
    JobLoop,
    RetryPolicy,
    Settlement,
    default_worker_id,
    job_state_for,
    record_failure,
)
from dicom_node.jobs.queue import Lease, complete
from dicom_node.ops.metrics.collect import NodeMetrics
from dicom_node.results import OutputKind
from dicom_node.scu.send import DeliveryOutcome, OutgoingFile, SendResult, send_files
from dicom_node.scu.stow import stow_files

log = structlog.get_logger(__name__)

MAX_STOW_BYTES = 256 * 1024 * 1024  # the largest STOW-RS body one delivery request builds


def pending_outputs(session: Session, lease: Lease, peer: PeerSettings) -> list[Output]:
    """This revision's current outputs the peer has neither accepted nor refused for good."""
    settled = select(Delivery.sop_instance_uid).where(
        Delivery.peer == peer.name,
        Delivery.outcome.in_((DeliveryOutcome.DELIVERED, DeliveryOutcome.REJECTED)),
    )
    query = (
        select(Output)
        .where(
            Output.study_instance_uid == lease.study_instance_uid,
            Output.study_revision == lease.study_revision,
            Output.state == OutputState.CURRENT,
            Output.sop_instance_uid.not_in(settled),
        )
        .order_by(
            # The rejection note goes last: the old results are withdrawn once the new ones are in.
            case((Output.kind == OutputKind.KOS, 1), else_=0),
            Output.kind,
            Output.sop_instance_uid,
        )
    )
    if not peer.withdraw_superseded:
        query = query.where(Output.kind != OutputKind.KOS)
    return list(session.scalars(query))


def record_results(
    session: Session, lease: Lease, results: Sequence[SendResult], *, now: datetime
) -> None:
    """Write one ledger row per (output, peer): the peer's latest answer."""
    for result in results:
        row = session.scalars(
            select(Delivery).where(
                Delivery.sop_instance_uid == result.sop_instance_uid, Delivery.peer == lease.target
            )
        ).one_or_none()
        if row is None:
            row = Delivery(sop_instance_uid=result.sop_instance_uid, peer=lease.target, attempts=0)
            session.add(row)
        row.job_id, row.outcome, row.status_code = lease.job_id, result.outcome, result.status_code
        row.detail, row.attempts, row.updated_at = result.detail, row.attempts + 1, now
        if result.outcome == DeliveryOutcome.DELIVERED:
            row.delivered_at = now


def reopen_rejected(session: Session, job: Job, *, now: datetime) -> int:
    """Before a manual retry of a delivery: let the rejected outputs be sent once more."""
    outputs = select(Output.sop_instance_uid).where(
        Output.study_instance_uid == job.study_instance_uid,
        Output.study_revision == job.study_revision,
    )
    return cast(
        CursorResult[Any],
        session.execute(
            update(Delivery)
            .where(
                Delivery.peer == job.target,
                Delivery.outcome == DeliveryOutcome.REJECTED,
                Delivery.sop_instance_uid.in_(outputs),
            )
            .values(outcome=DeliveryOutcome.FAILED, updated_at=now)
        ),
    ).rowcount


class DeliveryWorker(JobLoop):
    """Claims delivery jobs and sends their outputs, one job at a time."""

    kind = JobKind.DELIVERY
    name = "delivery"

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        worker_id: str | None = None,
        poll_seconds: float = 0.5,
        metrics: NodeMetrics | None = None,
    ) -> None:
        super().__init__(
            settings,
            factory,
            (worker_id or default_worker_id()) + ":delivery",
            poll_seconds,
            metrics,
        )
        self.peers = {peer.name: peer for peer in settings.peers}

    @property
    def policy(self) -> RetryPolicy:
        delivery = self.settings.delivery
        return RetryPolicy(
            delivery.backoff_seconds, delivery.max_backoff_seconds, delivery.give_up_after_seconds
        )

    def run_once(self) -> int:
        """Claim and deliver one job; returns how many were claimed (0 or 1)."""
        leases = self.claim(1)
        for lease in leases:
            try:
                self.deliver(lease)
            except JobLeaseLostError:
                self.lease_lost(lease)
        return len(leases)

    def deliver(self, lease: Lease) -> str:
        """One attempt at a delivery job; returns the job's new state."""
        peer = self.peers.get(lease.target)
        if peer is None or not peer.send_results:
            return self._finish(
                lease,
                [],
                DeliveryError(f"peer {lease.target!r} is no longer configured to receive results"),
            )
        with session_scope(self.factory) as session:
            files = [
                OutgoingFile(o.sop_class_uid, o.sop_instance_uid, self.storage_root / o.path)
                for o in pending_outputs(session, lease, peer)
            ]
        results, error = self._send(lease, files, peer)
        try:
            return self._finish(lease, results, error)
        finally:  # instances.sent: what went out is true whoever holds the lease now
            record_instances_sent(
                self.factory,
                study_instance_uid=lease.study_instance_uid,
                peer=peer,
                peer_name=lease.target,
                job_id=lease.job_id,
                files=len(files),
                results=results,
                error=error,
                batch_size=self.settings.delivery.batch_size,
            )

    def _send(
        self, lease: Lease, files: list[OutgoingFile], peer: PeerSettings
    ) -> tuple[list[SendResult], DeliveryError | None]:
        """Send in batches of ``[delivery] batch_size`` (one association each), renewing the
        lease between them; stops at the first batch that fails as a whole."""
        results: list[SendResult] = []
        for number, batch in enumerate(batches(files, peer, self.settings.delivery.batch_size)):
            if number:
                self.renew(lease)
            try:
                results += self._send_batch(batch, peer)
            except DeliveryError as exc:
                return results, exc
            except Exception as exc:  # a bug or an odd peer: retried, and given up in time
                log.error(
                    "delivery.send_error",
                    job_id=lease.job_id,
                    error_type=type(exc).__name__,
                    stack="".join(traceback.format_tb(exc.__traceback__)),
                )
                return results, TransientDeliveryError(
                    f"internal error while sending ({type(exc).__name__})"
                )
        return results, None

    def _send_batch(self, batch: list[OutgoingFile], peer: PeerSettings) -> list[SendResult]:
        """One association (C-STORE) or one request (STOW-RS, where ``dicomweb_url`` is set)."""
        timeout = self.settings.delivery.timeout_seconds
        if peer.dicomweb_url:
            return stow_files(batch, peer, timeout=timeout, tls=self.settings.tls)
        return send_files(
            batch,
            peer,
            calling_ae_title=self.settings.node.ae_title,
            timeout=timeout,
            tls=self.settings.tls,
        )

    def _finish(self, lease: Lease, results: list[SendResult], error: DeliveryError | None) -> str:
        now = utcnow()
        # What the peer answered is true whoever holds the lease now: the ledger is written
        # first, unfenced; then the job's next state, fenced on the lease.
        with session_scope(self.factory) as session:
            record_results(session, lease, results, now=now)
        with session_scope(self.factory) as session:
            state = self._next_state(session, lease, results, error, now)
        self.metrics.delivery_attempt(
            self.factory, lease, [r.outcome for r in results], error is not None, state, now
        )
        log.info(
            "job.finished",
            job_id=lease.job_id,
            kind=self.kind,
            outcome=state,
            peer=lease.target,
            sent=len(results),
            delivered=sum(r.outcome == DeliveryOutcome.DELIVERED for r in results),
            error=str(error) if error else None,
        )
        return state

    def _next_state(
        self,
        session: Session,
        lease: Lease,
        results: list[SendResult],
        error: DeliveryError | None,
        now: datetime,
    ) -> str:
        """Record the rejections as events, then complete the job, or settle it by what is
        still wrong (``jobs.loop.job_state_for``: transient retries, the rest is dead)."""
        for result in results:
            if result.outcome == DeliveryOutcome.REJECTED:
                record_event(
                    session,
                    "delivery.rejected",
                    now=now,
                    level="error",
                    study_instance_uid=lease.study_instance_uid,
                    job_id=lease.job_id,
                    sop_instance_uid=result.sop_instance_uid,
                    peer=lease.target,
                    detail=result.detail,
                )
        problem = error or _problem_of(session, lease, results)
        if problem is None:
            complete(session, lease, now=now)
            return JobState.DONE
        retryable = job_state_for(problem) is Settlement.RETRY
        return record_failure(
            session,
            lease,
            str(problem),
            retryable=retryable,
            policy=self.policy,
            now=now,
            min_delay_seconds=getattr(problem, "retry_after_seconds", 0.0),
        )


def batches(
    files: Sequence[OutgoingFile], peer: PeerSettings, batch_size: int
) -> list[list[OutgoingFile]]:
    """``files`` in sends of at most ``batch_size``; a STOW-RS request also at most
    :data:`MAX_STOW_BYTES` (its body is built in memory), and never empty."""
    limit = MAX_STOW_BYTES if peer.dicomweb_url else None
    out: list[list[OutgoingFile]] = []
    current: list[OutgoingFile] = []
    size = 0
    for item in files:
        item_size = item.path.stat().st_size if limit and item.path.is_file() else 0
        if current and (len(current) >= batch_size or (limit and size + item_size > limit)):
            out.append(current)
            current, size = [], 0
        current.append(item)
        size += item_size
    if current:
        out.append(current)
    return out


def _problem_of(
    session: Session, lease: Lease, results: Sequence[SendResult]
) -> DeliveryError | None:
    """What the peer's answers leave undone: outputs not yet accepted (transient), outputs
    refused now or in an earlier attempt (permanent), or nothing."""
    transient = [r for r in results if r.outcome == DeliveryOutcome.FAILED]
    rejected = [r for r in results if r.outcome == DeliveryOutcome.REJECTED]
    if transient:
        return TransientDeliveryError(_summary(transient, "not yet accepted"))
    if rejected:
        return DeliveryError(_summary(rejected, "rejected"))
    if _earlier_rejections(session, lease):
        return DeliveryError("outputs were rejected by the peer in an earlier attempt")
    return None


def _earlier_rejections(session: Session, lease: Lease) -> bool:
    outputs = select(Output.sop_instance_uid).where(
        Output.study_instance_uid == lease.study_instance_uid,
        Output.study_revision == lease.study_revision,
        Output.state == OutputState.CURRENT,
    )
    return (
        session.scalars(
            select(Delivery.id)
            .where(
                Delivery.peer == lease.target,
                Delivery.outcome == DeliveryOutcome.REJECTED,
                Delivery.sop_instance_uid.in_(outputs),
            )
            .limit(1)
        ).first()
        is not None
    )


def _summary(results: Sequence[SendResult], what: str) -> str:
    details = sorted({r.detail for r in results})
    return f"{len(results)} object(s) {what}: {', '.join(details)}"
