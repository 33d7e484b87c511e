"""A full disk: the worker keeps ``[storage] min_free_mb`` for its outputs, and a job that finds
the disk full waits (queued, its attempts untouched) instead of going dead; it finishes once
space is back.  The disk is "full" by the node's own rule (a reserve above the free space),
or really full (a small tmpfs filled to its last pages)."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dicom_node.clock import as_utc, utcnow
from dicom_node.config.settings import PeerSettings, Settings, StorageSettings, WebSettings
from dicom_node.db.models import Job, JobClaim, Output
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.errors import StorageError
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.delivery import DeliveryWorker
from dicom_node.jobs.space import is_disk_full
from dicom_node.jobs.worker import Worker
from dicom_node.store import write_atomic
from dicom_node.studies import close_quiet_studies
from dicom_node.web.users import add_user
from tests.helpers import SCU_AE, send_datasets
from tests.peers import PACS_AE, ScriptedPacs
from tests.web_support import PASSWORD, login

WAITING = "waiting for disk space"


def _reserve_above_free_space(settings: Settings) -> Settings:
    """The same node with ``min_free_mb`` 1000 MB above what is free now: full by its rule."""
    free_mb = int(shutil.disk_usage(settings.storage.root).free // 2**20)
    return dataclasses.replace(
        settings, storage=dataclasses.replace(settings.storage, min_free_mb=free_mb + 1000)
    )


def _job(node: Any, study_instance_uid: str) -> Job:
    with session_scope(node.session_factory) as session:
        job = session.scalars(
            select(Job).where(Job.kind == "analysis", Job.study_instance_uid == study_instance_uid)
        ).one()
        session.expunge(job)
        return job


def _wait_seconds(job: Job) -> float:
    assert job.next_attempt_at is not None
    return (as_utc(job.next_attempt_at) - as_utc(job.updated_at)).total_seconds()


def _let_the_wait_pass(node: Any, job_id: int) -> float:
    """Move the job's times back by its wait, as if that much time had passed; returns it."""
    with session_scope(node.session_factory) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.next_attempt_at is not None
        wait = timedelta(seconds=max(_wait_seconds(job), 0) + 1)
        job.next_attempt_at = as_utc(job.next_attempt_at) - wait
        job.updated_at = as_utc(job.updated_at) - wait
    return wait.total_seconds()


def _claims(node: Any, job_id: int) -> int:
    with session_scope(node.session_factory) as session:
        return int(
            session.scalar(
                select(func.count()).select_from(JobClaim).where(JobClaim.job_id == job_id)
            )
            or 0
        )


def _files(root: Path, folder: str) -> list[Path]:
    return [path for path in (root / folder).rglob("*") if path.is_file()]


def _admin_page(url: str) -> Any:
    """GET /admin with the session of the admin "boss" (logged in through the real form)."""
    client = login(url, "boss")
    try:
        return client.get("/admin")
    finally:
        client.close()


def _waiting_rows(page: str) -> str:
    """The "waiting for disk space" table of the admin page ('' when it is not shown)."""
    if 'id="waiting"' not in page:
        return ""
    start = page.index('id="waiting"')
    return page[start : page.index("</table>", start)]


def test_a_full_disk_holds_jobs_unclaimed_with_backoff_for_an_hour_and_they_finish_after(
    node_factory: Any,
) -> None:
    pacs = ScriptedPacs()
    try:
        node = node_factory(
            roles=("scp", "web"),
            peers=(
                PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
                PeerSettings(
                    name="pacs",
                    ae_title=PACS_AE,
                    host="127.0.0.1",
                    port=pacs.port,
                    send_results=True,
                ),
            ),
            web=WebSettings(host="127.0.0.1", port=0, refresh_seconds=0),
        )
        source = make_cxr_dataset(rows=64, columns=64)
        assert send_datasets(node.scp_port, [source]) == [0]  # received under the normal reserve
        close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
        study = str(source.StudyInstanceUID)
        root = Path(node.settings.storage.root)
        bundle = load_bundle(node.settings)

        full = Worker(_reserve_above_free_space(node.settings), node.session_factory, bundle)
        assert full.run_once() == 0  # nothing claimed
        job = _job(node, study)
        assert (job.state, job.attempts, job.max_attempts) == ("queued", 0, 3)
        assert (job.last_error or "").startswith(WAITING), job.last_error
        assert "storage.min_free_mb" in (job.last_error or "")
        assert _wait_seconds(job) == pytest.approx(60)  # [scheduler] storage_full_retry_seconds
        assert _claims(node, job.id) == 0
        assert _files(root, "outputs") == [] and _files(root, "results") == []

        with session_scope(node.session_factory) as session:
            add_user(session, username="boss", password=PASSWORD, role="admin", now=utcnow())
        page = _admin_page(node.web_url)
        assert page.status_code == 200
        rows = _waiting_rows(page.text)
        assert f'data-job="{job.id}"' in rows and WAITING in rows
        assert "1 job(s) waiting for disk space" in page.text

        # More than an hour of a full disk: each round the job is due again, and waits longer.
        waited, waits = 0.0, []
        while waited < 3600:
            waited += _let_the_wait_pass(node, job.id)
            assert full.run_once() == 0
            waits.append(_wait_seconds(_job(node, study)))
        assert waits[:5] == pytest.approx([120, 240, 480, 600, 600])  # doubling, capped
        job = _job(node, study)
        assert (job.state, job.attempts, job.max_attempts) == ("queued", 0, 3)
        assert _claims(node, job.id) == 0 and _files(root, "outputs") == []

        # Space is back: the job runs once, its outputs are written and delivered.
        _let_the_wait_pass(node, job.id)
        assert Worker(node.settings, node.session_factory, bundle).run_once() == 1
        job = _job(node, study)
        assert (job.state, job.attempts, job.last_error) == ("done", 1, None)
        with session_scope(node.session_factory) as session:
            outputs = {row.sop_instance_uid: row.kind for row in session.scalars(select(Output))}
        assert sorted(outputs.values()) == ["sc", "sr"]
        assert DeliveryWorker(node.settings, node.session_factory).run_once() == 1
        assert set(pacs.received) == set(outputs)
        page = _admin_page(node.web_url)
        assert _waiting_rows(page.text) == "" and "1 job(s) waiting" not in page.text
    finally:
        pacs.stop()


def _fill(root: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about ``leave_bytes`` free on the file system of ``root``."""
    ballast = root / "ballast"
    ballast.write_bytes(b"\0" * max(shutil.disk_usage(root).free - leave_bytes, 0))
    assert shutil.disk_usage(root).free <= leave_bytes + 8192
    return ballast


def test_a_disk_that_is_full_when_outputs_are_written_makes_jobs_wait_not_die(
    small_tmpfs: Path, node_factory: Any
) -> None:
    node = node_factory(storage=StorageSettings(root=str(small_tmpfs), min_free_mb=10))
    frontal = make_cxr_dataset(rows=64, columns=64, seed=1)
    lateral = make_cxr_dataset(rows=64, columns=64, view_position="LL", seed=2)
    assert send_datasets(node.scp_port, [frontal, lateral]) == [0, 0]
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    # No reserve at all, and a disk with a few kilobytes left: the claim goes ahead, the SR
    # and SC (and the lateral study's "not analysed" SR) do not fit.
    settings = dataclasses.replace(
        node.settings, storage=StorageSettings(root=str(small_tmpfs), min_free_mb=0)
    )
    worker = Worker(settings, node.session_factory, load_bundle(settings))
    ballast = _fill(small_tmpfs, leave_bytes=4096)
    studies = (str(frontal.StudyInstanceUID), str(lateral.StudyInstanceUID))
    for attempt in range(1, 6):  # more rounds than max_attempts
        assert worker.run_once() == 2
        for study in studies:
            job = _job(node, study)
            assert (job.state, job.attempts) == ("queued", attempt), job.last_error
            assert job.max_attempts == 3 + attempt  # the attempt is given back
            assert (job.last_error or "").startswith(WAITING), job.last_error
            _let_the_wait_pass(node, job.id)
    assert _files(small_tmpfs, "outputs") == [] and _files(small_tmpfs, "results") == []
    # The file system's own answer on a write past the last page is known for "full" too.
    with pytest.raises(StorageError) as refused:
        write_atomic(small_tmpfs, small_tmpfs / "one-more.bin", [b"\0" * 65536])
    assert is_disk_full(refused.value) and "No space left" in str(refused.value)

    ballast.unlink()
    assert worker.run_once() == 2
    states = {study: _job(node, study).state for study in studies}
    assert states == {studies[0]: "done", studies[1]: "skipped"}
    with session_scope(node.session_factory) as session:
        kinds = sorted(
            (row.study_instance_uid == studies[1], row.kind)
            for row in session.scalars(select(Output))
        )
    assert kinds == [(False, "sc"), (False, "sr"), (True, "sr")]
