"""Retention: exactly the eligible received files are purged; rows, results and outputs stay.

Studies are built through the real pipeline (C-STORE, close, worker, delivery to two scripted
PACS) in every state that matters; time moves by passing ``now`` to the purge.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from dicom_node.clock import utcnow
from dicom_node.config.settings import (
    AnalysisSettings,
    DeliverySettings,
    PeerSettings,
    RetentionSettings,
    WebSettings,
)
from dicom_node.db.models import (
    AnalysisResult,
    Delivery,
    Event,
    Finding,
    Instance,
    Job,
    Output,
    Study,
)
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.delivery import DeliveryWorker
from dicom_node.jobs.worker import Worker
from dicom_node.ops.retention import PURGED_EVENT, RetentionReport, run_retention, tick_retention
from dicom_node.scheduler import build_scheduler
from dicom_node.studies import close_quiet_studies
from dicom_node.web.users import add_user
from tests.helpers import SCU_AE, free_port, run_cli, send_datasets, write_config
from tests.peers import PACS_AE, ScriptedPacs
from tests.web_support import PASSWORD, login

DAYS = 30
TRANSIENT_REJECT = (2, 1, 2)  # A-ASSOCIATE-RJ rejected-transient (PS3.8 Table 9-21)


@pytest.fixture
def two_pacs() -> Any:
    pacs = ScriptedPacs(), ScriptedPacs()
    yield pacs
    for scripted in pacs:
        scripted.stop()


@dataclass
class Pipeline:
    """Drives the real stages one step at a time (no background threads)."""

    node: Any
    worker: Worker
    delivery: DeliveryWorker

    @property
    def root(self) -> Path:
        return Path(self.node.settings.storage.root)

    def receive(self, *datasets: Any) -> str:
        assert send_datasets(self.node.scp_port, list(datasets)) == [0] * len(datasets)
        return str(datasets[0].StudyInstanceUID)

    def close(self, max_attempts: int = 3) -> None:
        close_quiet_studies(
            self.node.session_factory, quiet_seconds=0, max_attempts=max_attempts, now=utcnow()
        )

    def analyse(self) -> None:
        assert self.worker.run_once() == 1

    def deliver(self, jobs: int = 2) -> None:
        for _ in range(jobs):
            assert self.delivery.run_once() == 1

    def block_results(self, study_instance_uid: str) -> None:
        """A file where the study's results folder must go: the analysis cannot be stored."""
        (self.root / "results").mkdir(exist_ok=True)
        (self.root / "results" / study_instance_uid).write_text("in the way")

    def retention(self, now: datetime, dry_run: bool = False) -> RetentionReport:
        return run_retention(
            self.node.session_factory, self.root, images_days=DAYS, now=now, dry_run=dry_run
        )


def _pipeline(node_factory: Any, pacs: tuple[ScriptedPacs, ...], **sections: Any) -> Pipeline:
    peers = (
        PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
        *(
            PeerSettings(
                name=f"pacs-{i}",
                ae_title=PACS_AE,
                host="127.0.0.1",
                port=scripted.port,
                send_results=True,
            )
            for i, scripted in enumerate(pacs)
        ),
    )
    node = node_factory(
        peers=peers,
        analysis=AnalysisSettings(backoff_seconds=3600),
        delivery=DeliverySettings(backoff_seconds=3600, max_backoff_seconds=3600),
        **sections,
    )
    return Pipeline(
        node,
        Worker(node.settings, node.session_factory, load_bundle(node.settings)),
        DeliveryWorker(node.settings, node.session_factory),
    )


def _cxr(seed: int, **kwargs: Any) -> Any:
    return make_cxr_dataset(rows=128, columns=128, seed=seed, **kwargs)


def _build_every_state(p: Pipeline, pacs_b: ScriptedPacs) -> tuple[dict[str, str], datetime]:
    """One study per state; those before the returned moment finished earlier than the rest."""
    uids: dict[str, str] = {}
    first = _cxr(1)
    uids["delivered_old"] = p.receive(
        first, _cxr(2, view_position="LL", study_instance_uid=first.StudyInstanceUID)
    )
    p.close(), p.analyse(), p.deliver()
    uids["skipped_old"] = p.receive(_cxr(3, view_position="LL"))  # a "not analysed" SR
    p.close(), p.analyse(), p.deliver()
    pacs_b.reject = TRANSIENT_REJECT
    uids["one_peer_missing"] = p.receive(_cxr(4))
    p.close(), p.analyse(), p.deliver()
    pacs_b.reject, pacs_b.statuses = None, [0xC000]
    uids["delivery_dead"] = p.receive(_cxr(5))
    p.close(), p.analyse(), p.deliver()
    pacs_b.statuses = [0x0000]
    uids["analysis_dead"] = p.receive(_cxr(6))
    p.block_results(uids["analysis_dead"])
    p.close(max_attempts=1), p.analyse()
    uids["analysis_failed"] = p.receive(_cxr(7))
    p.block_results(uids["analysis_failed"])
    p.close(max_attempts=3), p.analyse()
    time.sleep(0.01)
    middle = utcnow()
    time.sleep(0.01)
    uids["delivered_recent"] = p.receive(_cxr(8))
    p.close(), p.analyse(), p.deliver()
    uids["delivery_pending"] = p.receive(_cxr(9))
    p.close(), p.analyse()  # both deliveries queued, never attempted
    uids["not_analysed"] = p.receive(_cxr(10))
    p.close()
    uids["not_closed"] = p.receive(_cxr(11))
    return uids, middle


def _states(p: Pipeline) -> dict[tuple[str, str, str], str]:
    with session_scope(p.node.session_factory) as session:
        return {
            (j.study_instance_uid, j.kind, j.target): j.state for j in session.scalars(select(Job))
        }


def _files(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


def _instances(p: Pipeline) -> dict[str, Instance]:
    with session_scope(p.node.session_factory) as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        session.expunge_all()
    return rows


def _paths_of(p: Pipeline, studies: set[str]) -> set[str]:
    return {row.path for row in _instances(p).values() if row.study_instance_uid in studies}


def _result_counts(p: Pipeline) -> tuple[int, ...]:
    with session_scope(p.node.session_factory) as session:
        return tuple(
            int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (Instance, Job, AnalysisResult, Finding, Output, Delivery)
        )


def _purge_events(p: Pipeline) -> Counter[str]:
    with session_scope(p.node.session_factory) as session:
        return Counter(
            session.scalars(select(Event.study_instance_uid).where(Event.name == PURGED_EVENT))
        )


def _assert_purged_exactly(
    p: Pipeline, purged: set[str], removed: set[str], before: set[str]
) -> None:
    """Exactly the files ``removed`` went since ``before``; rows are marked purged exactly
    for the studies ``purged``; every other file and row stayed."""
    after = _files(p.root)
    assert before - after == removed
    assert after == before - removed  # nothing else removed, nothing added
    for row in _instances(p).values():
        assert (row.purged_at is not None) == (row.study_instance_uid in purged), row.path


def test_retention_removes_exactly_the_eligible_files_and_leaves_the_database_consistent(
    node_factory: Any, two_pacs: tuple[ScriptedPacs, ScriptedPacs]
) -> None:
    p = _pipeline(node_factory, two_pacs)
    uids, middle = _build_every_state(p, two_pacs[1])
    states = _states(p)
    assert states[(uids["skipped_old"], "analysis", "")] == "skipped"
    assert states[(uids["one_peer_missing"], "delivery", "pacs-1")] == "failed"
    assert states[(uids["delivery_dead"], "delivery", "pacs-1")] == "dead"
    assert states[(uids["analysis_dead"], "analysis", "")] == "dead"
    assert states[(uids["analysis_failed"], "analysis", "")] == "failed"
    assert states[(uids["delivery_pending"], "delivery", "pacs-0")] == "queued"
    assert states[(uids["not_analysed"], "analysis", "")] == "queued"
    outputs = {path for path in _files(p.root) if not path.startswith("instances/")}
    counts = _result_counts(p)

    # 30 days after the moment between the two groups: only the older delivered ones.
    old_enough = {uids["delivered_old"], uids["skipped_old"]}
    before = _files(p.root)
    planned = p.retention(middle + timedelta(days=DAYS), dry_run=True)
    assert _files(p.root) == before and _purge_events(p) == Counter()
    assert {s.study_instance_uid for s in planned.studies} == old_enough
    assert planned.removed == 3 and planned.bytes_freed == sum(
        (p.root / path).stat().st_size for path in _paths_of(p, old_enough)
    )
    report = p.retention(middle + timedelta(days=DAYS))
    assert {s.study_instance_uid for s in report.studies} == old_enough
    assert (report.removed, report.missing, report.failed) == (3, 0, 0)
    assert report.bytes_freed == planned.bytes_freed
    _assert_purged_exactly(p, old_enough, _paths_of(p, old_enough), before)
    assert _purge_events(p) == Counter(old_enough)
    again = p.retention(middle + timedelta(days=DAYS))
    assert again.studies == () and _files(p.root) == before - _paths_of(p, old_enough)

    # Much later every delivered study qualifies; the state alone keeps the others.  One
    # file is already gone by hand: it is recorded as purged, not an error.
    recent = _paths_of(p, {uids["delivered_recent"]})
    os.unlink(p.root / next(iter(recent)))
    before_late = _files(p.root)
    late = p.retention(utcnow() + timedelta(days=DAYS + 1))
    assert [s.study_instance_uid for s in late.studies] == [uids["delivered_recent"]]
    assert (late.removed, late.missing, late.failed, late.bytes_freed) == (0, 1, 0, 0)
    delivered = old_enough | {uids["delivered_recent"]}
    _assert_purged_exactly(p, delivered, recent, before_late | recent)
    assert p.retention(utcnow() + timedelta(days=DAYS + 1)).studies == ()

    assert _result_counts(p) == counts  # no row of any kind was removed or added
    assert outputs <= _files(p.root)  # every output, CAM and result file is still there
    assert _states(p) == states
    with session_scope(p.node.session_factory) as session:
        details = [
            json.loads(e.detail)
            for e in session.scalars(
                select(Event).where(Event.name == PURGED_EVENT).order_by(Event.id)
            )
        ]
    counts_by_run = [(d["removed"], d["missing"]) for d in details]  # studies go in UID order
    assert sorted(counts_by_run[:2]) == [(1, 0), (2, 0)] and counts_by_run[2:] == [(0, 1)]


def test_a_study_re_opened_after_its_purge_is_analysed_from_the_images_still_stored(
    node_factory: Any,
) -> None:
    pacs = ScriptedPacs()
    try:
        p = _pipeline(node_factory, (pacs,))
        frontal, lateral = _cxr(1), _cxr(2)
        for ds in (frontal, lateral):
            p.receive(ds)
            p.close(), p.analyse(), p.deliver(1)
        assert len(p.retention(utcnow() + timedelta(days=DAYS + 1)).studies) == 2
        # New images arrive in both purged studies: revision 2 of each.
        newer = _cxr(3, study_instance_uid=frontal.StudyInstanceUID)
        p.receive(newer)
        p.receive(_cxr(4, view_position="LL", study_instance_uid=lateral.StudyInstanceUID))
        p.close()
        assert p.worker.run_once() == 2
        with session_scope(p.node.session_factory) as session:
            jobs = {
                j.study_instance_uid: j
                for j in session.scalars(
                    select(Job).where(Job.kind == "analysis", Job.study_revision == 2)
                )
            }
            result = session.get(AnalysisResult, jobs[str(frontal.StudyInstanceUID)].id)
            session.expunge_all()
        assert jobs[str(frontal.StudyInstanceUID)].state == "done"
        assert result is not None and result.sop_instance_uid == str(newer.SOPInstanceUID)
        skipped = jobs[str(lateral.StudyInstanceUID)]
        assert skipped.state == "skipped"
        assert skipped.reason == (
            "not analysed: lateral view; 1 earlier image(s) purged by retention"
        )
        # Once delivered, the re-opened revision's own image becomes eligible in its turn.
        p.deliver(2)
        later = p.retention(utcnow() + timedelta(days=DAYS + 1))
        purged = sorted((s.study_instance_uid, s.study_revision, s.removed) for s in later.studies)
        assert purged == sorted(
            [(str(frontal.StudyInstanceUID), 2, 1), (str(lateral.StudyInstanceUID), 2, 1)]
        )
        assert all(row.purged_at is not None for row in _instances(p).values())
    finally:
        pacs.stop()


def test_an_image_sent_again_after_its_purge_is_stored_again_and_re_analysed(
    node_factory: Any,
) -> None:
    pacs = ScriptedPacs()
    try:
        p = _pipeline(node_factory, (pacs,))
        image = _cxr(1)
        p.receive(image)
        p.close(), p.analyse(), p.deliver(1)
        assert len(p.retention(utcnow() + timedelta(days=DAYS + 1)).studies) == 1
        row = _instances(p)[str(image.SOPInstanceUID)]
        assert row.purged_at is not None and not (p.root / row.path).exists()
        p.receive(image)  # the PACS sends the same image again: it must be held again
        row = _instances(p)[str(image.SOPInstanceUID)]
        assert row.purged_at is None and (p.root / row.path).is_file()
        assert row.study_revision == 2
        p.close()
        p.analyse()
        with session_scope(p.node.session_factory) as session:
            job = session.scalars(
                select(Job).where(Job.kind == "analysis", Job.study_revision == 2)
            ).one()
            study = session.get(Study, str(image.StudyInstanceUID))
            assert job.state == "done" and study.instance_count == 1
    finally:
        pacs.stop()


def test_the_study_page_says_image_purged_and_the_picture_route_answers_404(
    node_factory: Any,
) -> None:
    pacs = ScriptedPacs()
    try:
        p = _pipeline(
            node_factory,
            (pacs,),
            roles=("scp", "web"),
            web=WebSettings(host="127.0.0.1", port=0, refresh_seconds=0),
        )
        study = p.receive(_cxr(1))
        p.close(), p.analyse(), p.deliver(1)
        with session_scope(p.node.session_factory) as session:
            add_user(session, username="rad", password=PASSWORD, role="radiologist", now=utcnow())
        client = login(p.node.web_url)
        assert client.get(f"/studies/{study}/image.png").status_code == 200
        assert "image-purged" not in client.get(f"/studies/{study}").text
        assert len(p.retention(utcnow() + timedelta(days=DAYS + 1)).studies) == 1
        page = client.get(f"/studies/{study}")
        assert page.status_code == 200
        assert "Image purged by retention" in page.text and 'id="study-image"' not in page.text
        assert 'id="findings"' in page.text  # the results are still shown
        picture = client.get(f"/studies/{study}/image.png?finding=Pneumothorax")
        assert picture.status_code == 404 and "image purged by retention" in picture.text
        with session_scope(p.node.session_factory) as session:
            output = session.scalars(select(Output)).first()
        assert output is not None
        download = client.get(f"/studies/{study}/outputs/{output.sop_instance_uid}.dcm")
        assert download.status_code == 200  # outputs are never purged
    finally:
        pacs.stop()


def test_cli_retention_run_dry_run_counts_and_the_real_run_purges_and_reports_bytes(
    node_factory: Any, db_url: str, tmp_path: Path
) -> None:
    pacs = ScriptedPacs()
    try:
        p = _pipeline(node_factory, (pacs,))
        study = p.receive(_cxr(1))
        p.close(), p.analyse(), p.deliver(1)
        p.receive(_cxr(2))
        p.close(), p.analyse(), p.deliver(1)  # delivered just now: kept at 1 day
        with session_scope(p.node.session_factory) as session:  # this one finished 2 days ago
            session.execute(
                update(Job)
                .where(Job.study_instance_uid == study)
                .values(updated_at=utcnow() - timedelta(days=2))
            )
        size = (p.root / next(iter(_paths_of(p, {study})))).stat().st_size
        config = write_config(
            tmp_path / "node.toml",
            root=p.root,
            db_url=db_url,
            port=free_port(),
            extra="[retention]\nimages_days = 1\n",
        )
        before = _files(p.root)
        dry = run_cli(config, "retention", "run", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"would purge 1 file(s) of 1 study(ies), {size} bytes" in dry.stdout
        assert "dry run: nothing was removed" in dry.stdout and _files(p.root) == before
        real = run_cli(config, "retention", "run")
        assert real.returncode == 0, real.stderr
        assert f"purged 1 file(s) of 1 study(ies), {size} bytes" in real.stdout
        assert before - _files(p.root) == _paths_of(p, {study})
        off = write_config(tmp_path / "off.toml", root=p.root, db_url=db_url, port=free_port())
        kept = run_cli(off, "retention", "run")
        assert kept.returncode == 0 and "retention is off" in kept.stdout
    finally:
        pacs.stop()


def test_a_file_that_cannot_be_removed_keeps_its_row_and_is_tried_again(node_factory: Any) -> None:
    pacs = ScriptedPacs()
    try:
        p = _pipeline(node_factory, (pacs,))
        study = p.receive(_cxr(1))
        p.close(), p.analyse(), p.deliver(1)
        (path,) = _paths_of(p, {study})
        stored = (p.root / path).read_bytes()
        os.unlink(p.root / path)
        (p.root / path).mkdir()  # unlink() of a folder fails (EISDIR), as an I/O error would
        report = p.retention(utcnow() + timedelta(days=DAYS + 1))
        assert (report.removed, report.missing, report.failed) == (0, 0, 1)
        assert all(row.purged_at is None for row in _instances(p).values())
        (p.root / path).rmdir()
        (p.root / path).write_bytes(stored)
        retried = p.retention(utcnow() + timedelta(days=DAYS + 1))
        assert (retried.removed, retried.failed) == (1, 0) and not (p.root / path).exists()
        assert all(row.purged_at is not None for row in _instances(p).values())
    finally:
        pacs.stop()


def test_worker_role_schedules_the_purge_only_when_retention_is_on_and_the_tick_purges(
    node_factory: Any,
) -> None:
    pacs = ScriptedPacs()
    try:
        p = _pipeline(node_factory, (pacs,))
        assert (
            build_scheduler(p.node.settings, p.node.session_factory).get_job("retention") is None
        )  # images_days = 0: images are kept
        settings = dataclasses.replace(
            p.node.settings, retention=RetentionSettings(images_days=DAYS, interval_minutes=15)
        )
        job = build_scheduler(settings, p.node.session_factory).get_job("retention")
        assert job is not None and job.trigger.interval == timedelta(minutes=15)
        study = p.receive(_cxr(1))
        p.close(), p.analyse(), p.deliver(1)
        tick_retention(settings, p.node.session_factory)
        assert all(row.purged_at is None for row in _instances(p).values())  # delivered now
        with session_scope(p.node.session_factory) as session:
            session.execute(
                update(Job)
                .where(Job.study_instance_uid == study)
                .values(updated_at=utcnow() - timedelta(days=DAYS, minutes=1))
            )
        tick_retention(settings, p.node.session_factory)
        assert all(row.purged_at is not None for row in _instances(p).values())
        assert not _paths_of(p, {study}) & _files(p.root)
    finally:
        pacs.stop()
