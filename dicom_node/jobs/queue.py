"""The only code that creates or changes job rows.

Jobs are unique per (kind, study, revision, target), so enqueueing is idempotent: a
scheduler tick that runs twice, or two nodes closing the same study, make one job.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicom_node.db.models import Job, JobKind, JobState
from dicom_node.db.upsert import insert_ignore
from dicom_node.events import record_event

# States from which a job may still be replaced by a newer revision's job.
_SUPERSEDABLE = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value,
                 JobState.DONE.value, JobState.SKIPPED.value)


def enqueue_analysis(session: Session, *, study_instance_uid: str, study_revision: int,
                     max_attempts: int, now: datetime) -> Job:
    """Queue the analysis of one revision of a study, or return the job that already does."""
    inserted = insert_ignore(session, Job, {
        "kind": JobKind.ANALYSIS.value, "state": JobState.QUEUED.value,
        "study_instance_uid": study_instance_uid, "study_revision": study_revision,
        "target": "", "attempts": 0, "max_attempts": max_attempts,
        "next_attempt_at": now, "created_at": now, "updated_at": now,
    })
    job = session.scalars(select(Job).where(
        Job.kind == JobKind.ANALYSIS.value, Job.study_instance_uid == study_instance_uid,
        Job.study_revision == study_revision, Job.target == "")).one()
    if inserted:
        record_event(session, "job.queued", now=now, study_instance_uid=study_instance_uid,
                     job_id=job.id, kind=job.kind, study_revision=study_revision)
    return job


def supersede_older_analyses(session: Session, *, study_instance_uid: str,
                             study_revision: int, by_job_id: int, now: datetime) -> list[int]:
    """Mark analysis jobs of earlier revisions superseded; returns their ids.

    A running job is superseded too: its worker's completion is fenced (the state is no
    longer ``running`` under its lease), so its late result changes nothing.
    """
    ids = list(session.scalars(select(Job.id).where(
        Job.kind == JobKind.ANALYSIS.value, Job.study_instance_uid == study_instance_uid,
        Job.study_revision < study_revision, Job.state.in_(_SUPERSEDABLE))))
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(
            state=JobState.SUPERSEDED.value, superseded_by=by_job_id, updated_at=now,
            reason=f"superseded by job {by_job_id} (study revision {study_revision})"))
        for job_id in ids:
            record_event(session, "job.superseded", now=now,
                         study_instance_uid=study_instance_uid, job_id=job_id,
                         superseded_by=by_job_id)
    return ids


def count_by_state(session: Session) -> dict[tuple[str, str], int]:
    """Number of jobs per (kind, state)."""
    rows = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state))
    return {(kind, state): count for kind, state, count in rows}
