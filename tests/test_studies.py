"""Study assembly: quiet studies get exactly one analysis job; late instances supersede it."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.db.models import Job, JobState, Study
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.studies import close_quiet_studies
from tests.conftest import wait_until
from tests.helpers import send_datasets


def _jobs(node: Any) -> list[Job]:
    with session_scope(node.session_factory) as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def _close(node: Any, seconds_from_now: float) -> list[int]:
    return close_quiet_studies(
        node.session_factory,
        quiet_seconds=30,
        max_attempts=3,
        now=utcnow() + timedelta(seconds=seconds_from_now),
    )


def test_study_is_closed_only_after_quiet_time_with_exactly_one_job(node: Any) -> None:
    first = make_cxr_dataset(rows=32, columns=32, seed=1)
    second = make_cxr_dataset(
        rows=32, columns=32, seed=2, view_position="LL", study_instance_uid=first.StudyInstanceUID
    )
    assert send_datasets(node.scp_port, [first, second]) == [0, 0]
    assert _close(node, 10) == []
    assert _jobs(node) == []
    (job_id,) = _close(node, 31)
    assert _close(node, 62) == []
    (job,) = _jobs(node)
    assert (job.id, job.kind, job.state, job.study_revision) == (job_id, "analysis", "queued", 1)
    assert job.study_instance_uid == first.StudyInstanceUID


def test_late_instance_reopens_study_and_new_job_supersedes_old(node: Any) -> None:
    first = make_cxr_dataset(rows=32, columns=32, seed=1)
    assert send_datasets(node.scp_port, [first]) == [0]
    (old_id,) = _close(node, 31)
    late = make_cxr_dataset(
        rows=32, columns=32, seed=3, view_position="AP", study_instance_uid=first.StudyInstanceUID
    )
    assert send_datasets(node.scp_port, [late]) == [0]
    assert _close(node, 10) == []  # re-opened, not yet quiet again
    (new_id,) = _close(node, 31)
    old, new = _jobs(node)
    assert (old.id, old.state, old.superseded_by) == (old_id, JobState.SUPERSEDED.value, new_id)
    assert (new.id, new.state, new.study_revision) == (new_id, JobState.QUEUED.value, 2)
    with session_scope(node.session_factory) as session:
        study = session.get(Study, first.StudyInstanceUID)
        assert study is not None
        assert (study.revision, study.closed_revision, study.instance_count) == (2, 2, 2)


def test_concurrent_associations_into_one_study_make_one_revision_and_one_job(node: Any) -> None:
    study_uid = make_cxr_dataset(rows=16, columns=16).StudyInstanceUID
    batches = [
        [
            make_cxr_dataset(rows=16, columns=16, seed=i * 10 + j, study_instance_uid=study_uid)
            for j in range(5)
        ]
        for i in range(4)
    ]
    results: list[list[int | None]] = []
    threads = [
        threading.Thread(target=lambda b=b: results.append(send_datasets(node.scp_port, b)))
        for b in batches
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(s for r in results for s in r) == [0] * 20
    _close(node, 31)
    (job,) = _jobs(node)
    with session_scope(node.session_factory) as session:
        study = session.get(Study, study_uid)
        assert study is not None and (study.revision, study.instance_count) == (1, 20)
    assert job.study_revision == 1


def test_running_scheduler_closes_quiet_studies_by_itself(node_factory: Any) -> None:
    node = node_factory(roles=("scp", "worker"))
    ds = make_cxr_dataset(rows=32, columns=32)
    assert send_datasets(node.scp_port, [ds]) == [0]
    assert wait_until(lambda: len(_jobs(node)) == 1, timeout=15)
    assert _jobs(node)[0].study_instance_uid == ds.StudyInstanceUID


def test_dead_job_of_an_older_revision_is_superseded_and_cannot_be_retried(node: Any) -> None:
    import pytest
    from sqlalchemy import update

    from dicom_node.errors import JobStateError
    from dicom_node.jobs.queue import requeue

    first = make_cxr_dataset(rows=32, columns=32, seed=1)
    assert send_datasets(node.scp_port, [first]) == [0]
    (old_id,) = _close(node, 31)
    with session_scope(node.session_factory) as session:
        session.execute(update(Job).where(Job.id == old_id).values(state="dead"))
    late = make_cxr_dataset(rows=32, columns=32, seed=2, study_instance_uid=first.StudyInstanceUID)
    assert send_datasets(node.scp_port, [late]) == [0]
    (new_id,) = _close(node, 31)
    old, new = _jobs(node)
    assert (old.state, old.superseded_by, new.state) == ("superseded", new_id, "queued")
    with pytest.raises(JobStateError, match="superseded"):
        with session_scope(node.session_factory) as session:
            requeue(session, old_id, now=utcnow(), attempts=3)
