"""A re-opened study: new results under new UIDs, old ones superseded and withdrawn by IOCM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.config.settings import PeerSettings
from dicom_node.db.models import Delivery, Job, Output
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.delivery import DeliveryWorker
from dicom_node.jobs.worker import Worker
from dicom_node.studies import close_quiet_studies
from tests.helpers import SCU_AE, send_datasets
from tests.peers import PACS_AE, ScriptedPacs
from tests.test_outputs import dciodvfy_errors


def _round(node: Any, datasets: list[Any]) -> None:
    assert set(send_datasets(node.scp_port, datasets)) == {0}
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    Worker(node.settings, node.session_factory, load_bundle(node.settings)).run_once()
    while DeliveryWorker(node.settings, node.session_factory).run_once():
        pass


def test_reopened_study_supersedes_old_results_and_sends_a_rejection_note(
    node_factory: Any,
) -> None:
    withdrawing, keeping = ScriptedPacs(), ScriptedPacs()
    peers = (
        PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
        PeerSettings(
            name="iocm-pacs",
            ae_title=PACS_AE,
            host="127.0.0.1",
            port=withdrawing.port,
            send_results=True,
            withdraw_superseded=True,
        ),
        PeerSettings(
            name="plain-pacs",
            ae_title=PACS_AE,
            host="127.0.0.1",
            port=keeping.port,
            send_results=True,
        ),
    )
    try:
        node = node_factory(peers=peers)
        first = make_cxr_dataset(rows=256, columns=256, view_position="AP")
        _round(node, [first])
        with session_scope(node.session_factory) as session:
            old = {o.sop_instance_uid for o in session.scalars(select(Output))}
        later = make_cxr_dataset(
            rows=256, columns=256, seed=5, study_instance_uid=first.StudyInstanceUID
        )
        _round(node, [later])  # the study re-opens: revision 2, a new analysis
        with session_scope(node.session_factory) as session:
            outputs = {o.sop_instance_uid: o for o in session.scalars(select(Output))}
            session.expunge_all()
            jobs = session.scalars(select(Job.state).where(Job.kind == "delivery")).all()
        assert {outputs[uid].state for uid in old} == {"superseded"}
        current = {uid: o for uid, o in outputs.items() if o.state == "current"}
        assert sorted(o.kind for o in current.values()) == ["kos", "sc", "sr"]
        assert not set(current) & old  # a new revision: new UIDs
        assert set(jobs) == {"done"}
        note = next(o for o in current.values() if o.kind == "kos")
        path = Path(node.settings.storage.root) / note.path
        kos = pydicom.dcmread(path)
        assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"
        referenced = {
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in kos.ContentSequence
            if item.ValueType in ("IMAGE", "COMPOSITE")
        }
        assert referenced == old
        assert not dciodvfy_errors(path)
        assert withdrawing.received[-1] == note.sop_instance_uid  # withdrawn after the new ones
        assert note.sop_instance_uid not in keeping.received
        assert set(withdrawing.received) == set(outputs)
        assert set(keeping.received) == set(outputs) - {note.sop_instance_uid}
        with session_scope(node.session_factory) as session:
            peers_of_note = session.scalars(
                select(Delivery.peer).where(Delivery.sop_instance_uid == note.sop_instance_uid)
            ).all()
        assert peers_of_note == ["iocm-pacs"]
    finally:
        withdrawing.stop()
        keeping.stop()
