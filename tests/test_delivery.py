"""End to end with Orthanc as the PACS: study in by C-STORE, SR and SCs back, exactly once."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.config.settings import DeliverySettings, PeerSettings, SchedulerSettings
from dicom_node.db.models import Delivery, Job, JobClaim, Output
from dicom_node.db.session import make_session_factory, session_scope
from dicom_node.dev.samples import make_cxr_dataset
from tests.conftest import wait_until
from tests.helpers import NODE_AE, SCU_AE, NodeProcess, free_port, send_datasets, write_config
from tests.peers import Orthanc

PATIENT = ("Müller^Jürgen", "PID-4711", "19600131", "M")


def _study_file() -> tuple[pydicom.Dataset, bytes]:
    source = make_cxr_dataset(
        rows=1024, columns=896, patient_name=PATIENT[0], patient_id=PATIENT[1]
    )
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientBirthDate, source.PatientSex = PATIENT[2], PATIENT[3]
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    return source, buffer.getvalue()


def _orthanc_peer(orthanc: Orthanc) -> PeerSettings:
    return PeerSettings(
        name="orthanc",
        ae_title="ORTHANC",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        send_results=True,
    )


def _outputs(factory: Any) -> dict[str, str]:
    with session_scope(factory) as session:
        return dict(session.execute(select(Output.sop_instance_uid, Output.kind)).all())


def _held(orthanc: Orthanc, study: str) -> list[dict[str, Any]]:
    return [
        i for i in orthanc.instances_of_study(study) if i["MainDicomTags"].get("SOPInstanceUID")
    ]


@pytest.mark.slow
def test_orthanc_sends_a_study_and_receives_one_sr_and_the_scs_with_identical_patient(
    node_factory: Any, tmp_path: Path
) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")
    node = node_factory(
        roles=("scp", "worker"),
        peers=(_orthanc_peer(orthanc),),
        scheduler=SchedulerSettings(study_quiet_seconds=1, tick_seconds=0.2),
    )
    try:
        orthanc.start(NODE_AE, node.scp_port)
        source, data = _study_file()
        uploaded = orthanc.upload(data)
        orthanc.send_study_to_node(uploaded["ParentStudy"])
        study = str(source.StudyInstanceUID)
        assert wait_until(lambda: len(_held(orthanc, study)) >= 3, timeout=120, interval=0.5)
        assert wait_until(lambda: _delivery_states(node.session_factory) == {"done"}, timeout=60)
        held = _held(orthanc, study)
        ours = _outputs(node.session_factory)
        sop_uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in held} - {source.SOPInstanceUID}
        assert sop_uids == set(ours) and sorted(ours.values()) == ["sc", "sr"]
        for instance in held:
            tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
            assert (
                tags["PatientName"],
                tags["PatientID"],
                tags["PatientBirthDate"],
                tags["PatientSex"],
            ) == PATIENT
            assert tags["StudyInstanceUID"] == study
    finally:
        orthanc.stop()


def _delivery_states(factory: Any) -> set[str]:
    with session_scope(factory) as session:
        return set(session.scalars(select(Job.state).where(Job.kind == "delivery")))


@pytest.mark.slow
def test_pacs_down_for_three_retry_intervals_then_back_gets_everything_exactly_once(
    node_factory: Any, tmp_path: Path
) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")  # ports chosen, not started: the PACS is down
    node = node_factory(
        roles=("scp", "worker"),
        peers=(
            PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
            _orthanc_peer(orthanc),
        ),
        scheduler=SchedulerSettings(study_quiet_seconds=0.5, tick_seconds=0.2),
        delivery=DeliverySettings(backoff_seconds=0.5, max_backoff_seconds=1),
    )
    sources = [make_cxr_dataset(rows=256, columns=256, seed=seed) for seed in range(3)]
    assert send_datasets(node.scp_port, sources) == [0, 0, 0]
    try:

        def attempts() -> list[int]:
            with session_scope(node.session_factory) as session:
                return list(session.scalars(select(Job.attempts).where(Job.kind == "delivery")))

        assert wait_until(lambda: len(attempts()) == 3 and min(attempts()) >= 4, timeout=120)
        assert _delivery_states(node.session_factory) <= {"failed", "running"}
        orthanc.start(NODE_AE, node.scp_port)
        assert wait_until(lambda: _delivery_states(node.session_factory) == {"done"}, timeout=60)
        ours = _outputs(node.session_factory)
        held = [
            i["MainDicomTags"]["SOPInstanceUID"]
            for s in sources
            for i in _held(orthanc, str(s.StudyInstanceUID))
        ]
        assert sorted(held) == sorted(ours) and len(ours) == 6  # an SR and an SC per study
        with session_scope(node.session_factory) as session:
            rows = session.scalars(select(Delivery)).all()
        assert len(rows) == 6 and {(r.outcome, r.attempts) for r in rows} == {("delivered", 1)}
    finally:
        orthanc.stop()


@pytest.mark.slow
def test_kill_9_between_pacs_ack_and_ledger_commit_resends_the_same_uids_once(
    engine: Any, db_url: str, models_dir: Path, tmp_path: Path
) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("holding back only the ledger commit needs a table lock (PostgreSQL)")
    orthanc = Orthanc(tmp_path / "orthanc")
    port = free_port()
    orthanc.start(NODE_AE, port)
    root = tmp_path / "store"
    config = write_config(
        tmp_path / "node.toml",
        root=root,
        db_url=db_url,
        port=port,
        lease_seconds=3,
        models_dir=models_dir,
        quiet_seconds=0.5,
        extra=f'[[peers]]\nname = "orthanc"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f"port = {orthanc.dicom_port}\nsend_results = true\n",
    )
    factory = make_session_factory(engine)
    source = make_cxr_dataset(rows=256, columns=256)
    study = str(source.StudyInstanceUID)
    plain = db_url.replace("postgresql+psycopg://", "postgresql://")
    node = NodeProcess(config, tmp_path / "node.log")
    try:
        with psycopg.connect(plain) as blocker:  # holds back every ledger write
            blocker.execute("LOCK TABLE deliveries IN EXCLUSIVE MODE")
            node.start(port, 60, "scp", "worker")
            assert send_datasets(port, [source]) == [0]
            assert wait_until(lambda: len(_held(orthanc, study)) == 2, timeout=120)  # SR, SC
            assert _delivery_states(factory) == {"running"}  # acknowledged, not yet recorded
            node.kill()
            blocker.rollback()
        with session_scope(factory) as session:
            assert session.scalars(select(Delivery)).all() == []
        sent = {i["MainDicomTags"]["SOPInstanceUID"] for i in _held(orthanc, study)}
        node = NodeProcess(config, tmp_path / "node2.log")
        node.start(port, 60, "scp", "worker")
        assert wait_until(lambda: _delivery_states(factory) == {"done"}, timeout=60)
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in _held(orthanc, study)} == sent
        with session_scope(factory) as session:
            job = session.scalars(select(Job).where(Job.kind == "delivery")).one()
            claims = session.scalars(select(JobClaim).where(JobClaim.job_id == job.id)).all()
            ledger = session.scalars(select(Delivery)).all()
        assert len(claims) == 2  # sent before the kill, and again after the rescue
        assert {r.sop_instance_uid for r in ledger} == sent
        assert {r.outcome for r in ledger} == {"delivered"}
    finally:
        node.stop()
        orthanc.stop()
