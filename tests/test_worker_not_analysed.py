"""An image whose pixel data cannot be decoded: the job ends dead with the decode error, and
the "not analysed" SR naming that reason is still written and delivered, so the PACS hears of
every study it sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless
from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.config.settings import OutputSettings, PeerSettings
from dicom_node.db.models import Job, Output
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.delivery import DeliveryWorker
from dicom_node.jobs.worker import Worker
from dicom_node.studies import close_quiet_studies
from tests.helpers import SCU_AE, associate
from tests.peers import PACS_AE, ScriptedPacs


def _truncated_jpeg2000() -> Dataset:
    """A DX chest image in JPEG 2000 whose one fragment holds half of its codestream."""
    ds = make_cxr_dataset(rows=256, columns=256)
    ds.compress(JPEG2000Lossless)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    return ds


def _send_as_jpeg2000(port: int, ds: Dataset) -> int | None:
    """C-STORE ``ds`` in its own transfer syntax, proposed alone (so the node must take it)."""
    assoc = associate(port, [str(ds.SOPClassUID)], transfer_syntaxes=[JPEG2000Lossless])
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def _peers(pacs: ScriptedPacs) -> tuple[PeerSettings, ...]:
    return (
        PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
        PeerSettings(
            name="pacs", ae_title=PACS_AE, host="127.0.0.1", port=pacs.port, send_results=True
        ),
    )


def _analyse(node: Any) -> Job:
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    worker = Worker(node.settings, node.session_factory, load_bundle(node.settings))
    while worker.run_once():
        pass
    with session_scope(node.session_factory) as session:
        job = session.scalars(select(Job).where(Job.kind == "analysis")).one()
        session.expunge(job)
        return job


def _texts(report: Any) -> str:
    found: list[str] = []

    def walk(items: Any) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(report.ContentSequence)
    return " ".join(found)


def test_an_undecodable_image_ends_dead_and_still_sends_a_not_analysed_sr_naming_why(
    node_factory: Any,
) -> None:
    pacs = ScriptedPacs()
    try:
        node = node_factory(peers=_peers(pacs))
        source = _truncated_jpeg2000()
        assert _send_as_jpeg2000(node.scp_port, source) == 0
        job = _analyse(node)
        assert (job.state, job.attempts) == ("dead", 1)
        assert "pixel data cannot be decoded" in (job.last_error or "")
        with session_scope(node.session_factory) as session:
            (output,) = session.scalars(select(Output)).all()
            session.expunge(output)
            delivery = session.scalars(select(Job).where(Job.kind == "delivery")).one()
        assert (output.kind, output.job_id) == ("sr", job.id)
        assert (delivery.target, delivery.state) == ("pacs", "queued")
        report = hd.sr.srread(Path(node.settings.storage.root) / output.path)
        assert report.StudyInstanceUID == source.StudyInstanceUID
        assert "not analysed: pixel data cannot be decoded" in _texts(report)
        assert DeliveryWorker(node.settings, node.session_factory).run_once() == 1
        assert pacs.received == [output.sop_instance_uid]
    finally:
        pacs.stop()


def test_an_undecodable_image_sends_no_sr_when_not_analysed_reports_are_off(
    node_factory: Any,
) -> None:
    node = node_factory(outputs=OutputSettings(report_not_analysed=False))
    assert _send_as_jpeg2000(node.scp_port, _truncated_jpeg2000()) == 0
    job = _analyse(node)
    assert job.state == "dead" and "pixel data cannot be decoded" in (job.last_error or "")
    with session_scope(node.session_factory) as session:
        assert session.scalars(select(Output)).all() == []
