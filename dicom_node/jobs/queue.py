"""The only code that changes job rows once they exist (``jobs.enqueue`` creates them).

Workers claim jobs with a lease (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL; on
SQLite every transaction is ``BEGIN IMMEDIATE``, which serialises claimers).  Each claim is
logged in ``job_claims`` with a fresh lease token, and every state change a worker makes is
fenced on that token: a worker whose lease was rescued changes nothing when it finishes late.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from dicom_node.clock import as_utc
from dicom_node.db.models import Job, JobClaim, JobState
from dicom_node.errors import JobLeaseLostError, JobNotFoundError, JobStateError
from dicom_node.events import record_event
from dicom_node.jobs.space import next_wait_seconds

_CLAIMABLE = (JobState.QUEUED.value, JobState.FAILED.value)


@dataclass(frozen=True)
class Lease:
    """A worker's hold on one job; every later change to the job must present it."""

    job_id: int
    kind: str
    study_instance_uid: str
    study_revision: int
    target: str
    attempt: int
    max_attempts: int
    token: str
    created_at: datetime | None = None  # when the job was queued (deliveries give up by age)
    waited_seconds: float = 0.0  # how long it last waited for disk space (0: it did not)
    mode: str = "live"  # analysis: the model's mode when the job was queued (live or shadow)


DELIVERY_MAX_ATTEMPTS = 100000
# ``last_error`` of a job that waits for disk space starts with this (the admin page shows it).
WAITING_FOR_SPACE = "waiting for disk space"


def count_by_state(session: Session) -> dict[tuple[str, str], int]:
    """Number of jobs per (kind, state)."""
    rows = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state))
    return {(kind, state): count for kind, state, count in rows}


def claim_jobs(
    session: Session,
    *,
    kind: str,
    worker_id: str,
    limit: int,
    now: datetime,
    lease_seconds: float,
    targets: Sequence[str] = (),
) -> list[Lease]:
    """Take up to ``limit`` due jobs of ``kind`` for this worker, oldest first; with
    ``targets``, only jobs for those (a worker claims the analyses of the models it loaded)."""
    due = [Job.kind == kind, Job.state.in_(_CLAIMABLE), Job.next_attempt_at <= now]
    if targets:
        due.append(Job.target.in_(list(targets)))
    ids = list(
        session.scalars(
            select(Job.id)
            .where(*due)
            .order_by(Job.next_attempt_at, Job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )  # PostgreSQL; SQLite holds BEGIN IMMEDIATE
    leases = []
    for job in session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.id)):
        token, waited = uuid.uuid4().hex, _waited_seconds(job)
        job.state, job.attempts, job.updated_at = JobState.RUNNING.value, job.attempts + 1, now
        job.lease_owner, job.lease_token = worker_id, token
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        session.add(
            JobClaim(
                job_id=job.id,
                attempt=job.attempts,
                worker_id=worker_id,
                lease_token=token,
                claimed_at=now,
            )
        )
        leases.append(
            Lease(
                job.id,
                job.kind,
                job.study_instance_uid,
                job.study_revision,
                job.target,
                job.attempts,
                job.max_attempts,
                token,
                as_utc(job.created_at),
                waited,
                job.mode or "live",
            )
        )
    return leases


def _waited_seconds(job: Job) -> float:
    """The length of the job's last wait for disk space, or 0 when it was not waiting: the
    rows a wait writes hold it as ``next_attempt_at - updated_at``."""
    if not (job.last_error or "").startswith(WAITING_FOR_SPACE) or job.next_attempt_at is None:
        return 0.0
    return max((as_utc(job.next_attempt_at) - as_utc(job.updated_at)).total_seconds(), 0.0)


def hold_for_space(
    session: Session, *, kind: str, detail: str, now: datetime, first_seconds: float
) -> list[int]:
    """Before claiming on a full disk: push every due job of ``kind`` back, unclaimed.

    No attempt is taken (nothing runs), so no job can go dead while the disk is full.  Each
    job's wait doubles from ``first_seconds`` up to ten minutes; ``last_error`` says why.
    Returns the ids of the jobs held.
    """
    jobs = list(
        session.scalars(
            select(Job)
            .where(Job.kind == kind, Job.state.in_(_CLAIMABLE), Job.next_attempt_at <= now)
            .order_by(Job.id)
            .with_for_update(skip_locked=True)
        )
    )
    for job in jobs:
        previous = _waited_seconds(job)
        delay = next_wait_seconds(previous, first_seconds)
        job.state, job.updated_at = JobState.QUEUED.value, now
        job.next_attempt_at = now + timedelta(seconds=delay)
        job.last_error = f"{WAITING_FOR_SPACE}: {detail}"
        if not previous:  # one event when the wait begins, not one per round
            record_event(
                session,
                "job.waiting_for_space",
                now=now,
                level="warning",
                study_instance_uid=job.study_instance_uid,
                job_id=job.id,
                error=detail,
                retry_in_seconds=delay,
            )
    return [job.id for job in jobs]


def wait_for_space(
    session: Session, lease: Lease, *, detail: str, now: datetime, first_seconds: float
) -> float:
    """A claimed job found the disk full: queue it again after a doubling wait (fenced).

    The attempt is given back (``max_attempts`` grows by one; attempt numbers keep counting,
    since the claim log is unique per attempt), so a disk full for an hour kills no job.
    Returns the wait in seconds.
    """
    delay = next_wait_seconds(lease.waited_seconds, first_seconds)
    _fenced(
        session,
        lease,
        now,
        state=JobState.QUEUED.value,
        last_error=f"{WAITING_FOR_SPACE}: {detail}",
        max_attempts=Job.max_attempts + 1,
        next_attempt_at=now + timedelta(seconds=delay),
    )
    record_event(
        session,
        "job.waiting_for_space",
        now=now,
        level="warning",
        study_instance_uid=lease.study_instance_uid,
        job_id=lease.job_id,
        attempt=lease.attempt,
        error=detail,
        retry_in_seconds=delay,
    )
    return delay


def _fenced(session: Session, lease: Lease, now: datetime, **values: object) -> None:
    changed = cast(
        CursorResult[Any],
        session.execute(
            update(Job)
            .where(
                Job.id == lease.job_id,
                Job.state == JobState.RUNNING.value,
                Job.lease_token == lease.token,
            )
            .values(
                lease_owner=None, lease_token=None, lease_expires_at=None, updated_at=now, **values
            )
        ),
    ).rowcount
    if not changed:
        raise JobLeaseLostError(f"job {lease.job_id} is no longer held by this lease")


def complete(session: Session, lease: Lease, *, now: datetime) -> None:
    """Mark the job done (fenced on the lease)."""
    _fenced(session, lease, now, state=JobState.DONE.value, last_error=None)
    record_event(
        session,
        "job.done",
        now=now,
        study_instance_uid=lease.study_instance_uid,
        job_id=lease.job_id,
        attempt=lease.attempt,
    )


def skip(session: Session, lease: Lease, *, reason: str, now: datetime) -> None:
    """Mark the job skipped: not analysed, with the reason (fenced on the lease)."""
    _fenced(session, lease, now, state=JobState.SKIPPED.value, reason=reason)
    record_event(
        session,
        "job.skipped",
        now=now,
        study_instance_uid=lease.study_instance_uid,
        job_id=lease.job_id,
        reason=reason,
    )


def fail(
    session: Session,
    lease: Lease,
    *,
    error: str,
    retryable: bool,
    now: datetime,
    backoff_seconds: float,
    max_backoff_seconds: float | None = None,
    min_delay_seconds: float = 0.0,
) -> str:
    """Record a failed attempt: retry later (``failed``) or give up (``dead``); returns the state.

    The delay doubles with each attempt: ``backoff_seconds * 2 ** (attempt - 1)``, up to
    ``max_backoff_seconds`` when given, and is never under ``min_delay_seconds``.
    """
    if retryable and lease.attempt < lease.max_attempts:
        delay = backoff_seconds * 2 ** min(lease.attempt - 1, 60)
        if max_backoff_seconds is not None:
            delay = min(delay, max_backoff_seconds)
        delay = max(delay, min_delay_seconds)
        state = JobState.FAILED.value
        _fenced(
            session,
            lease,
            now,
            state=state,
            last_error=error,
            next_attempt_at=now + timedelta(seconds=delay),
        )
    else:
        state = JobState.DEAD.value
        _fenced(session, lease, now, state=state, last_error=error)
    level = "warning" if state == JobState.FAILED else "error"
    record_event(
        session,
        f"job.{state}",
        now=now,
        level=level,
        study_instance_uid=lease.study_instance_uid,
        job_id=lease.job_id,
        attempt=lease.attempt,
        error=error,
    )
    return state


def extend_lease(session: Session, lease: Lease, *, now: datetime, lease_seconds: float) -> None:
    """Push the lease's expiry out while its job is still being worked on (fenced)."""
    changed = cast(
        CursorResult[Any],
        session.execute(
            update(Job)
            .where(
                Job.id == lease.job_id,
                Job.state == JobState.RUNNING.value,
                Job.lease_token == lease.token,
            )
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        ),
    ).rowcount
    if not changed:
        raise JobLeaseLostError(f"job {lease.job_id} is no longer held by this lease")


def reclaim_expired(session: Session, *, now: datetime) -> list[int]:
    """Rescue running jobs whose lease expired (their worker died): retry, or dead when spent."""
    jobs = list(
        session.scalars(
            select(Job)
            .where(Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)
            .with_for_update(skip_locked=True)
        )
    )
    for job in jobs:
        spent = job.attempts >= job.max_attempts
        job.state = JobState.DEAD.value if spent else JobState.QUEUED.value
        job.last_error = f"lease of {job.lease_owner} expired (attempt {job.attempts})"
        job.lease_owner = job.lease_token = job.lease_expires_at = None
        job.next_attempt_at, job.updated_at = now, now
        record_event(
            session,
            "job.rescued",
            now=now,
            level="warning",
            job_id=job.id,
            study_instance_uid=job.study_instance_uid,
            state=job.state,
        )
    return [job.id for job in jobs]


def requeue(
    session: Session, job_id: int, *, now: datetime, attempts: int, restart_clock: bool = False
) -> None:
    """Put a dead or failed job back in the queue with ``attempts`` more tries.

    Attempt numbers keep counting up (the claim log is unique per job and attempt).
    ``restart_clock`` counts a delivery's give-up time from now (the requeue is an event).
    """
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(f"job {job_id} does not exist")
    if job.state not in (JobState.DEAD.value, JobState.FAILED.value):
        raise JobStateError(f"job {job_id} is {job.state}; only dead or failed jobs are retried")
    job.state, job.next_attempt_at, job.updated_at = JobState.QUEUED.value, now, now
    job.max_attempts = job.attempts + attempts
    if restart_clock:
        job.created_at = now
    record_event(
        session, "job.requeued", now=now, job_id=job_id, study_instance_uid=job.study_instance_uid
    )
