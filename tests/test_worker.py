"""Workers: leased claims across processes, rescue after kill -9, poison jobs, fencing."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dicom_node.clock import utcnow
from dicom_node.config.settings import AnalysisSettings, SchedulerSettings
from dicom_node.db.models import AnalysisResult, Finding, Job, JobClaim
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.errors import JobLeaseLostError
from dicom_node.inference.localization import heatmap_in_source
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.cams import load_cam
from dicom_node.jobs.queue import claim_jobs, complete, reclaim_expired, requeue
from dicom_node.jobs.worker import Worker
from dicom_node.studies import close_quiet_studies
from tests.conftest import wait_until
from tests.helpers import NodeProcess, free_port, send_datasets, write_config


def _queue_studies(node: Any, count: int, size: int = 64) -> None:
    """Send ``count`` one-image studies and close them all, queueing ``count`` jobs."""
    datasets = [make_cxr_dataset(rows=size, columns=size, seed=i) for i in range(count)]
    for start in range(0, count, 100):
        assert set(send_datasets(node.scp_port, datasets[start : start + 100])) == {0}
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())


def _counts(node: Any) -> tuple[Counter[str], Counter[int], int]:
    with session_scope(node.session_factory) as session:
        states = Counter(session.scalars(select(Job.state)))
        claims = Counter(session.scalars(select(JobClaim.job_id)))
        results = session.scalar(select(func.count()).select_from(AnalysisResult))
    return states, claims, results or 0


def _spawn_worker(tmp_path: Path, node: Any, name: str, **config: Any) -> NodeProcess:
    """A ``serve --role worker`` process on the node's database and storage, not yet up."""
    port = free_port()
    path = write_config(
        tmp_path / f"{name}.toml",
        root=Path(node.settings.storage.root),
        db_url=node.settings.database_url,
        port=port,
        models_dir=Path(node.settings.model.models_dir),
        **config,
    )
    process = NodeProcess(path, tmp_path / f"{name}.log")
    process.spawn("worker")
    return process


def _worker_process(tmp_path: Path, node: Any, name: str, **config: Any) -> NodeProcess:
    process = _spawn_worker(tmp_path, node, name, **config)
    process.wait_started()
    return process


# Exactly once needs two processes racing for one queue, not volume: 64 jobs are 8 claims of
# 8, so each process claims again while the other holds leases, the first claim of each a race
# for the same rows (both poll an empty queue when every job appears at once).
RACED_JOBS = 64


def _claim_batches(node: Any) -> list[tuple[str, int]]:
    """(process id, jobs taken) of each claim (one call, one time) in the claim log, in the
    order the claims were made."""
    with session_scope(node.session_factory) as session:
        rows = session.execute(
            select(JobClaim.worker_id, JobClaim.claimed_at).order_by(
                JobClaim.claimed_at, JobClaim.id
            )
        ).all()
    batches = Counter((worker_id, claimed_at) for worker_id, claimed_at in rows)
    return [(worker_id.split(":")[1], n) for (worker_id, _), n in batches.items()]


@pytest.mark.slow
@pytest.mark.timeout(900)  # each job also builds and writes its SR and SC
def test_two_worker_processes_racing_for_one_queue_process_each_job_exactly_once(
    node: Any, tmp_path: Path
) -> None:
    # Both processes are up and polling before any job exists: they race from the first claim.
    workers = [_spawn_worker(tmp_path, node, f"w{i}", batch_size=8) for i in range(2)]
    try:
        for worker in workers:
            worker.wait_started()
        _queue_studies(node, RACED_JOBS)
        assert wait_until(
            lambda: _counts(node)[0] == Counter({"done": RACED_JOBS}), timeout=600, interval=1.0
        ), _counts(node)[0]
    finally:
        for worker in workers:
            assert worker.stop() == 0
    states, claims, results = _counts(node)
    assert set(claims.values()) == {1} and len(claims) == RACED_JOBS  # the claim log: once each
    assert results == RACED_JOBS
    batches = _claim_batches(node)
    shares: Counter[str] = Counter()
    for process, taken in batches:
        shares[process] += taken
    assert len(shares) == 2  # both processes took work
    assert min(shares.values()) >= RACED_JOBS // 4, shares  # each a substantial share
    # They took turns (at least A, B, A, B): neither worked only before or after the other.
    owners = [process for process, _ in batches]
    assert sum(1 for a, b in pairwise(owners) if a != b) >= 3, batches


KILLED_JOBS = 16


@pytest.mark.slow
def test_kill_9_mid_job_is_rescued_after_the_lease_and_completed_once(
    node: Any, tmp_path: Path
) -> None:
    # Two batches of 8 large images: the kill lands in the first (a batch takes seconds), the
    # second is never claimed before it; both kinds of job must end done, each once.
    _queue_studies(node, KILLED_JOBS, size=1500)
    first = _worker_process(tmp_path, node, "first", lease_seconds=3, batch_size=8)

    def running() -> list[int]:
        with session_scope(node.session_factory) as session:
            return list(session.scalars(select(Job.id).where(Job.state == "running")))

    assert wait_until(lambda: bool(running()), timeout=120, interval=0.02)
    first.kill()
    orphaned = running()
    assert orphaned, "the kill must land while jobs are held"
    # The rescuer holds its own claims longer: on a loaded machine a batch of 8 large images
    # can take longer than 3 s to prepare, and its own lease lapsing would only re-queue work.
    second = _worker_process(tmp_path, node, "second", lease_seconds=60, batch_size=8)
    try:
        assert wait_until(
            lambda: _counts(node)[0] == Counter({"done": KILLED_JOBS}), timeout=300, interval=0.5
        ), _counts(node)[0]
    finally:
        assert second.stop() == 0
    _, claims, results = _counts(node)
    assert results == KILLED_JOBS
    assert all(claims[job_id] == 2 for job_id in orphaned)  # claimed by each worker once
    assert len(claims) == KILLED_JOBS > len(orphaned)
    # A job the killed worker never held may still be claimed twice: the 3 s lease can lapse
    # while the survivor prepares a batch on a loaded machine, and fencing makes that harmless
    # (one result each, asserted above and below), so no claim count is asserted for those.
    with session_scope(node.session_factory) as session:
        rows = session.scalars(select(Finding.job_id)).all()
    assert Counter(rows) == {job_id: 18 for job_id in set(rows)} and len(set(rows)) == KILLED_JOBS


def test_poison_job_goes_dead_after_max_attempts_while_others_finish(node_factory: Any) -> None:
    node = node_factory(
        scheduler=SchedulerSettings(max_attempts=3), analysis=AnalysisSettings(backoff_seconds=0.01)
    )
    _queue_studies(node, 5)
    with session_scope(node.session_factory) as session:
        poison = session.scalars(select(Job).order_by(Job.id)).first()
        assert poison is not None
    # A file where the study's results folder must go: every attempt fails to store.
    results = Path(node.settings.storage.root) / "results"
    results.mkdir()
    (results / poison.study_instance_uid).write_text("in the way")
    worker = Worker(node.settings, node.session_factory, load_bundle(node.settings))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and set(_counts(node)[0]) - {"done", "dead"}:
        worker.run_once()
        time.sleep(0.02)
    with session_scope(node.session_factory) as session:
        dead = session.get(Job, poison.id)
        assert dead is not None and dead.state == "dead" and dead.attempts == 3
        assert "cannot write" in (dead.last_error or "")
    assert _counts(node)[0] == Counter({"done": 4, "dead": 1})
    # Once the cause is fixed, `jobs retry` re-queues it with a fresh budget; attempt numbers
    # keep counting, so the claim log stays unique.
    (results / poison.study_instance_uid).unlink()
    with session_scope(node.session_factory) as session:
        requeue(session, poison.id, now=utcnow(), attempts=3)
    while worker.run_once():
        pass
    with session_scope(node.session_factory) as session:
        retried = session.get(Job, poison.id)
        assert retried is not None and (retried.state, retried.attempts) == ("done", 4)


def test_disk_error_writing_a_not_analysed_report_fails_the_attempt_and_never_strands_a_job(
    node_factory: Any,
) -> None:
    node = node_factory(
        scheduler=SchedulerSettings(max_attempts=2), analysis=AnalysisSettings(backoff_seconds=0.01)
    )
    lateral = make_cxr_dataset(rows=64, columns=64, view_position="LL", seed=1)
    frontal = make_cxr_dataset(rows=64, columns=64, seed=2)
    # A file where the lateral study's outputs folder must go: its "not analysed" SR cannot
    # be written, the disk error of that job only.
    outputs = Path(node.settings.storage.root) / "outputs"
    outputs.mkdir()
    (outputs / str(lateral.StudyInstanceUID)).write_text("in the way")
    assert set(send_datasets(node.scp_port, [lateral, frontal])) == {0}
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=2, now=utcnow())
    worker = Worker(node.settings, node.session_factory, load_bundle(node.settings))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and set(_counts(node)[0]) - {"done", "dead", "skipped"}:
        worker.run_once()  # an error escaping the batch would raise here
        time.sleep(0.02)
    with session_scope(node.session_factory) as session:
        jobs = {job.study_instance_uid: job for job in session.scalars(select(Job))}
    failed, analysed = jobs[str(lateral.StudyInstanceUID)], jobs[str(frontal.StudyInstanceUID)]
    assert (failed.state, failed.attempts) == ("dead", 2)
    assert "cannot write" in (failed.last_error or "")
    assert analysed.state == "done"


def test_late_completion_after_rescue_is_fenced(node: Any) -> None:
    _queue_studies(node, 1)
    with session_scope(node.session_factory) as session:
        (lease,) = claim_jobs(
            session, kind="analysis", worker_id="slow", limit=1, now=utcnow(), lease_seconds=1
        )
    with session_scope(node.session_factory) as session:
        assert reclaim_expired(session, now=utcnow() + timedelta(seconds=2)) == [lease.job_id]
    with session_scope(node.session_factory) as session:
        (second,) = claim_jobs(
            session,
            kind="analysis",
            worker_id="fast",
            limit=1,
            now=utcnow() + timedelta(seconds=2),
            lease_seconds=60,
        )
    with pytest.raises(JobLeaseLostError):
        with session_scope(node.session_factory) as session:
            complete(session, lease, now=utcnow())
    with session_scope(node.session_factory) as session:
        complete(session, second, now=utcnow())
        job = session.get(Job, lease.job_id)
        assert job is not None and (job.state, job.attempts) == ("done", 2)


def test_stored_heatmaps_rebuild_in_source_geometry_and_boxes_lie_inside(node: Any) -> None:
    ds = make_cxr_dataset(rows=300, columns=200)
    assert send_datasets(node.scp_port, [ds]) == [0]
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    Worker(node.settings, node.session_factory, load_bundle(node.settings)).run_once()
    with session_scope(node.session_factory) as session:
        result = session.scalars(select(AnalysisResult)).one()
        findings = session.scalars(select(Finding).where(Finding.job_id == result.job_id)).all()
    assert result.weights_status == "verified" and len(findings) == 18
    root = Path(node.settings.storage.root)
    for finding in findings:
        cam, geometry = load_cam(root, finding.heatmap_path or "")
        heatmap = heatmap_in_source(cam, geometry)
        assert heatmap.shape == (300, 200) and heatmap[:50].max() == 0  # crop rows 50-250
        for x0, y0, x1, y1 in json.loads(finding.boxes or "[]"):
            assert 0 <= x0 < x1 <= 200 and 50 <= y0 < y1 <= 250
