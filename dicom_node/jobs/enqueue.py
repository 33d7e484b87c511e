"""The only code that creates job rows, and replaces them with a newer revision's.

Jobs are unique per (kind, study, revision, target), so enqueueing is idempotent: a
scheduler tick that runs twice, or two nodes closing the same study, make one job.  What a
worker does with a job once it exists (claim, complete, fail, reclaim) is ``jobs.queue``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_node.db.models import Job, JobKind, JobState
from dicom_node.db.upsert import insert_ignore
from dicom_node.events import record_event
from dicom_node.jobs.queue import DELIVERY_MAX_ATTEMPTS

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


def enqueue_analysis(
    session: Session,
    *,
    study_instance_uid: str,
    study_revision: int,
    max_attempts: int,
    now: datetime,
    model: str = "",
    mode: str = "live",
) -> Job:
    """Queue the analysis of one revision of a study by ``model`` (its target; "" is the
    worker's first model) in ``mode``, or return the job that already does."""
    job, inserted = _insert_job(
        session,
        JobKind.ANALYSIS,
        study_instance_uid,
        study_revision,
        model,
        max_attempts,
        now,
        mode=mode,
    )
    if inserted:
        record_event(
            session,
            "job.queued",
            now=now,
            study_instance_uid=study_instance_uid,
            job_id=job.id,
            kind=job.kind,
            study_revision=study_revision,
            model=model,
            mode=mode,
        )
    return job


def supersede_older_analyses(
    session: Session,
    *,
    study_instance_uid: str,
    study_revision: int,
    by_job_id: int,
    now: datetime,
    model: str = "",
) -> list[int]:
    """Mark ``model``'s analysis jobs of earlier revisions superseded; returns their ids.

    A running job is superseded too: its worker's completion is fenced (the state is no
    longer ``running`` under its lease), so its late result changes nothing.
    """
    return _supersede(
        session,
        JobKind.ANALYSIS.value,
        model,
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
    job, inserted = _insert_job(
        session,
        JobKind.DELIVERY,
        study_instance_uid,
        study_revision,
        peer,
        DELIVERY_MAX_ATTEMPTS,
        now,
    )
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


def _insert_job(
    session: Session,
    kind: JobKind,
    study_instance_uid: str,
    study_revision: int,
    target: str,
    max_attempts: int,
    now: datetime,
    mode: str | None = None,
) -> tuple[Job, bool]:
    """The job of (kind, study, revision, target), inserted queued unless it exists; and
    whether this call inserted it (jobs are unique on those four columns)."""
    inserted = insert_ignore(
        session,
        Job,
        {
            "kind": kind.value,
            "state": JobState.QUEUED.value,
            "study_instance_uid": study_instance_uid,
            "study_revision": study_revision,
            "target": target,
            "mode": mode,
            "attempts": 0,
            "max_attempts": max_attempts,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        },
    )
    job = session.scalars(
        select(Job).where(
            Job.kind == kind.value,
            Job.study_instance_uid == study_instance_uid,
            Job.study_revision == study_revision,
            Job.target == target,
        )
    ).one()
    return job, bool(inserted)
