"""Delivery to a scripted PACS: every status, rejection and outage gets its defined outcome."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.clock import as_utc, utcnow
from dicom_node.config.settings import DeliverySettings, PeerSettings
from dicom_node.db.models import Delivery, Job, Output
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.delivery import DeliveryWorker
from dicom_node.jobs.queue import claim_jobs
from dicom_node.jobs.worker import Worker
from dicom_node.studies import close_quiet_studies
from tests.helpers import SCU_AE, free_port, run_cli, send_datasets, write_config
from tests.peers import PACS_AE, ScriptedPacs


@pytest.fixture
def pacs() -> Any:
    scripted = ScriptedPacs()
    yield scripted
    scripted.stop()


def _start(node_factory: Any, port: int, **delivery: Any) -> Any:
    peers = (
        PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
        PeerSettings(name="pacs", ae_title=PACS_AE, host="127.0.0.1", port=port, send_results=True),
    )
    return node_factory(peers=peers, delivery=DeliverySettings(**delivery))


def _analyse_new_study(node: Any, seed: int = 0) -> str:
    source = make_cxr_dataset(rows=128, columns=128, seed=seed)
    assert send_datasets(node.scp_port, [source]) == [0]
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    Worker(node.settings, node.session_factory, load_bundle(node.settings)).run_once()
    return str(source.StudyInstanceUID)


def _delivery(node: Any, study: str) -> tuple[Job, list[Delivery]]:
    with session_scope(node.session_factory) as session:
        job = session.scalars(
            select(Job).where(Job.kind == "delivery", Job.study_instance_uid == study)
        ).one()
        ledger = list(
            session.scalars(
                select(Delivery)
                .join(Output, Output.sop_instance_uid == Delivery.sop_instance_uid)
                .where(Output.study_instance_uid == study)
            )
        )
        session.expunge_all()
    return job, ledger


CASES = [  # status, job state, ledger outcome
    (0x0000, "done", "delivered"),
    (0xB000, "done", "delivered"),
    (0xB006, "done", "delivered"),
    (0xB007, "done", "delivered"),
    (0xA700, "failed", "failed"),
    (0xA7FF, "failed", "failed"),
    (0xA900, "dead", "rejected"),
    (0xC000, "dead", "rejected"),
    (0x0122, "dead", "rejected"),
    (0x0124, "dead", "rejected"),
]


def test_each_store_status_gets_its_defined_outcome(node_factory: Any, pacs: ScriptedPacs) -> None:
    # Retries an hour away: a slow machine must not bring an earlier case's retry due, or
    # run_once would claim that job instead of this case's.
    node = _start(node_factory, pacs.port, backoff_seconds=3600, max_backoff_seconds=3600)
    delivery = DeliveryWorker(node.settings, node.session_factory)
    for seed, (status, state, outcome) in enumerate(CASES):
        study = _analyse_new_study(node, seed)
        pacs.statuses = [status]
        assert delivery.run_once() == 1
        job, ledger = _delivery(node, study)
        assert job.state == state, hex(status)
        assert len(ledger) == 2 and {(row.outcome, row.status_code) for row in ledger} == {
            (outcome, status)
        }, hex(status)
        if state == "dead":
            assert f"0x{status:04X}" in (job.last_error or "")
        if state == "failed":
            assert as_utc(job.next_attempt_at) > utcnow()


def test_association_rejects_and_refusals_retry_or_die_by_kind(
    node_factory: Any, pacs: ScriptedPacs
) -> None:
    node = _start(node_factory, pacs.port)
    delivery = DeliveryWorker(node.settings, node.session_factory)
    pacs.reject = (2, 1, 2)  # rejected-transient, by the service user, no reason
    study = _analyse_new_study(node, 1)
    delivery.run_once()
    job, ledger = _delivery(node, study)
    assert (job.state, ledger) == ("failed", []) and "transient" in job.last_error
    pacs.reject = (1, 1, 7)  # rejected-permanent: called AE title not recognised
    study = _analyse_new_study(node, 2)
    delivery.run_once()
    job, _ = _delivery(node, study)
    assert job.state == "dead" and "permanently" in job.last_error
    pacs.reject = None
    assert not pacs.received  # nothing was sent through a rejected association


def test_transient_failures_back_off_doubling_to_the_cap_then_give_up(node_factory: Any) -> None:
    node = _start(
        node_factory,
        free_port(),
        backoff_seconds=30,
        max_backoff_seconds=100,
        give_up_after_seconds=3600,
    )
    study = _analyse_new_study(node)
    delivery = DeliveryWorker(node.settings, node.session_factory)
    delays, now = [], utcnow()
    for _ in range(5):  # nobody listens on the peer's port: connection refused
        with session_scope(node.session_factory) as session:
            job = session.scalars(select(Job).where(Job.kind == "delivery")).one()
            now = as_utc(job.next_attempt_at)
            (lease,) = claim_jobs(
                session, kind="delivery", worker_id="t", limit=1, now=now, lease_seconds=60
            )
        delivery.deliver(lease)
        job, _ = _delivery(node, study)
        delays.append(round((as_utc(job.next_attempt_at) - as_utc(job.updated_at)).total_seconds()))
    assert delays == [30, 60, 100, 100, 100] and job.state == "failed"
    with session_scope(node.session_factory) as session:
        job = session.get(Job, job.id)
        job.created_at = utcnow() - timedelta(hours=2)  # queued longer ago than give_up_after
        (lease,) = claim_jobs(
            session,
            kind="delivery",
            worker_id="t",
            limit=1,
            now=as_utc(job.next_attempt_at),
            lease_seconds=60,
        )
    assert delivery.deliver(lease) == "dead"
    job, _ = _delivery(node, study)
    assert "gave up after 3600 s" in job.last_error and "refused" in job.last_error


def test_jobs_retry_resends_a_dead_delivery_without_running_the_model(
    node_factory: Any, pacs: ScriptedPacs, tmp_path: Path
) -> None:
    node = _start(node_factory, pacs.port)
    study = _analyse_new_study(node)
    pacs.statuses = [0xA900]
    delivery = DeliveryWorker(node.settings, node.session_factory)
    delivery.run_once()
    job, _ = _delivery(node, study)
    assert job.state == "dead"
    pacs.statuses = [0x0000]
    config = write_config(
        tmp_path / "cli.toml",
        root=Path(node.settings.storage.root),
        db_url=node.settings.database_url,
        port=free_port(),
        extra=f'[[peers]]\nname = "pacs"\nae_title = "{PACS_AE}"\n'
        f'host = "127.0.0.1"\nport = {pacs.port}\nsend_results = true\n',
    )
    run = run_cli(config, "jobs", "retry", str(job.id))
    assert run.returncode == 0 and "2 rejected object(s) will be sent again" in run.stdout
    assert delivery.run_once() == 1
    job, ledger = _delivery(node, study)
    assert job.state == "done" and {row.outcome for row in ledger} == {"delivered"}
    with session_scope(node.session_factory) as session:
        analyses = session.scalars(select(Job).where(Job.kind == "analysis")).all()
    assert [a.attempts for a in analyses] == [1]  # the model ran once
    assert len(pacs.received) == 4 and len(set(pacs.received)) == 2  # same UIDs re-sent


def test_a_peer_that_takes_only_implicit_vr_still_gets_the_results(node_factory: Any) -> None:
    implicit_only = ScriptedPacs(transfer_syntaxes=[ImplicitVRLittleEndian])
    try:
        node = _start(node_factory, implicit_only.port)
        study = _analyse_new_study(node)
        DeliveryWorker(node.settings, node.session_factory).run_once()
        job, ledger = _delivery(node, study)
        assert job.state == "done" and {row.outcome for row in ledger} == {"delivered"}
        assert set(implicit_only.syntaxes) == {ImplicitVRLittleEndian}
    finally:
        implicit_only.stop()


def test_a_missing_output_file_is_rejected_with_its_reason_not_retried_forever(
    node_factory: Any, pacs: ScriptedPacs
) -> None:
    node = _start(node_factory, pacs.port)
    study = _analyse_new_study(node)
    with session_scope(node.session_factory) as session:
        lost = session.scalars(select(Output).where(Output.kind == "sc")).one()
        (Path(node.settings.storage.root) / lost.path).unlink()
    DeliveryWorker(node.settings, node.session_factory).run_once()
    job, ledger = _delivery(node, study)
    outcomes = {row.sop_instance_uid: (row.outcome, row.detail) for row in ledger}
    assert outcomes[lost.sop_instance_uid] == (
        "rejected",
        "the output file is missing from the storage root",
    )
    assert job.state == "dead" and "missing" in job.last_error
    assert len(pacs.received) == 1  # the SR still went
