"""The only code that creates or changes job rows.

Jobs are unique per (kind, study, revision, target), so enqueueing is idempotent: a
scheduler tick that runs twice, or two nodes closing the same study, make one job.

Workers claim jobs with a lease (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL; on
SQLite every transaction is ``BEGIN IMMEDIATE``, which serialises claimers).  Each claim is
logged in ``job_claims`` with a fresh lease token, and every state change a worker makes is
fenced on that token: a worker whose lease was rescued changes nothing when it finishes late.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from dicom_node.clock import as_utc
from dicom_node.db.models import Job, JobClaim, JobKind, JobState
from dicom_node.db.upsert import insert_ignore
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


# States from which a job may still be replaced by a newer revision's job (a dead one too,
# so that retrying it later cannot analyse a stale revision).
_SUPERSEDABLE = (
    JobState.QUEUED.value,
    JobState.RUNNING.value,
    JobState.FAILED.value,
    JobState.DONE.value,
    JobState.SKIPPED.value,
    JobState.DEAD.value,
)
# A delivery that is done stays done (the PACS holds those objects, the rejection note will
# withdraw them); one still waiting or dead is stopped.
_DELIVERY_SUPERSEDABLE = (
    JobState.QUEUED.value,
    JobState.RUNNING.value,
    JobState.FAILED.value,
    JobState.DEAD.value,
)
DELIVERY_MAX_ATTEMPTS = 100000
# ``last_error`` of a job that waits for disk space starts with this (the admin page shows it).
WAITING_FOR_SPACE = "waiting for disk space"


def enqueue_analysis(
    session: Session,
    *,
    study_instance_uid: str,
    study_revision: int,
    max_attempts: int,
    now: datetime,
) -> Job:
    """Queue the analysis of one revision of a study, or return the job that already does."""
    inserted = insert_ignore(
        session,
        Job,
        {
            "kind": JobKind.ANALYSIS.value,
            "state": JobState.QUEUED.value,
            "study_instance_uid": study_instance_uid,
            "study_revision": study_revision,
            "target": "",
            "attempts": 0,
            "max_attempts": max_attempts,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        },
    )
    job = session.scalars(
        select(Job).where(
            Job.kind == JobKind.ANALYSIS.value,
            Job.study_instance_uid == study_instance_uid,
            Job.study_revision == study_revision,
            Job.target == "",
        )
    ).one()
    if inserted:
        record_event(
            session,
            "job.queued",
            now=now,
            study_instance_uid=study_instance_uid,
            job_id=job.id,
            kind=job.kind,
            study_revision=study_revision,
        )
    return job


def supersede_older_analyses(
    session: Session, *, study_instance_uid: str, study_revision: int, by_job_id: int, now: datetime
) -> list[int]:
    """Mark analysis jobs of earlier revisions superseded; returns their ids.

    A running job is superseded too: its worker's completion is fenced (the state is no
    longer ``running`` under its lease), so its late result changes nothing.
    """
    return _supersede(
        session,
        JobKind.ANALYSIS.value,
        "",
        study_instance_uid=study_instance_uid,
        study_revision=study_revision,
        by_job_id=by_job_id,
        now=now,
    )


def supersede_older_deliveries(
    session: Session, *, study_instance_uid: str, study_revision: int, peer: str, now: datetime
) -> list[int]:
    """Stop delivering an earlier revision's outputs to ``peer``: they were replaced."""
    return _supersede(
        session,
        JobKind.DELIVERY.value,
        peer,
        study_instance_uid=study_instance_uid,
        study_revision=study_revision,
        by_job_id=None,
        now=now,
        states=_DELIVERY_SUPERSEDABLE,
    )


def _supersede(
    session: Session,
    kind: str,
    target: str,
    *,
    study_instance_uid: str,
    study_revision: int,
    by_job_id: int | None,
    now: datetime,
    states: tuple[str, ...] = (),
) -> list[int]:
    # One conditional UPDATE: a job that finished meanwhile (READ COMMITTED) is not touched.
    ids = list(
        session.scalars(
            update(Job)
            .where(
                Job.kind == kind,
                Job.target == target,
                Job.study_instance_uid == study_instance_uid,
                Job.study_revision < study_revision,
                Job.state.in_(states or _SUPERSEDABLE),
            )
            .values(
                state=JobState.SUPERSEDED.value,
                superseded_by=by_job_id,
                updated_at=now,
                reason=f"superseded by study revision {study_revision}"
                + (f" (job {by_job_id})" if by_job_id else ""),
            )
            .returning(Job.id)
        )
    )
    if ids:
        for job_id in sorted(ids):
            record_event(
                session,
                "job.superseded",
                now=now,
                study_instance_uid=study_instance_uid,
                job_id=job_id,
                superseded_by=by_job_id,
                kind=kind,
            )
    return sorted(ids)


def enqueue_delivery(
    session: Session, *, study_instance_uid: str, study_revision: int, peer: str, now: datetime
) -> Job:
    """Queue sending one revision's outputs to ``peer``, or return the job that already does.

    Deliveries are bounded by time (``[delivery] give_up_after_seconds``), not by a count of
    attempts, so ``max_attempts`` is only a backstop.
    """
    inserted = insert_ignore(
        session,
        Job,
        {
            "kind": JobKind.DELIVERY.value,
            "state": JobState.QUEUED.value,
            "study_instance_uid": study_instance_uid,
            "study_revision": study_revision,
            "target": peer,
            "attempts": 0,
            "max_attempts": DELIVERY_MAX_ATTEMPTS,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        },
    )
    job = session.scalars(
        select(Job).where(
            Job.kind == JobKind.DELIVERY.value,
            Job.study_instance_uid == study_instance_uid,
            Job.study_revision == study_revision,
            Job.target == peer,
        )
    ).one()
    if inserted:
        record_event(
            session,
            "job.queued",
            now=now,
            study_instance_uid=study_instance_uid,
            job_id=job.id,
            kind=job.kind,
            study_revision=study_revision,
            peer=peer,
        )
    return job


def count_by_state(session: Session) -> dict[tuple[str, str], int]:
    """Number of jobs per (kind, state)."""
    rows = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state))
    return {(kind, state): count for kind, state, count in rows}


def claim_jobs(
    session: Session, *, kind: str, worker_id: str, limit: int, now: datetime, lease_seconds: float
) -> list[Lease]:
    """Take up to ``limit`` due jobs of ``kind`` for this worker, oldest first."""
    ids = list(
        session.scalars(
            select(Job.id)
            .where(Job.kind == kind, Job.state.in_(_CLAIMABLE), Job.next_attempt_at <= now)
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
) -> str:
    """Record a failed attempt: retry later (``failed``) or give up (``dead``); returns the state.

    The delay doubles with each attempt: ``backoff_seconds * 2 ** (attempt - 1)``, up to
    ``max_backoff_seconds`` when given.
    """
    if retryable and lease.attempt < lease.max_attempts:
        delay = backoff_seconds * 2 ** min(lease.attempt - 1, 60)
        if max_backoff_seconds is not None:
            delay = min(delay, max_backoff_seconds)
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
