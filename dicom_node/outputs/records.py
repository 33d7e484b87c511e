"""Keep the outputs of an analysis: durable files, their rows, and the deliveries they need.

Files are written (fsynced, renamed) before the transaction that records them, so a row
never points at a missing file.  In that same transaction the outputs of earlier revisions
of the study are marked superseded and one delivery job per receiving peer is queued, so a
crash leaves either all of it or none (a retry rebuilds the same UIDs and paths).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_node.config.settings import PeerSettings
from dicom_node.db.models import Output, OutputState
from dicom_node.db.upsert import insert_ignore
from dicom_node.events import record_event
from dicom_node.jobs.queue import enqueue_delivery, supersede_older_deliveries
from dicom_node.outputs.build import BuiltOutput
from dicom_node.store import sha256_of, write_atomic

OUTPUTS_DIR = "outputs"


@dataclass(frozen=True)
class WrittenOutput:
    built: BuiltOutput
    relative_path: str
    sha256: str


def write_outputs(root: Path, study_instance_uid: str, outputs: Sequence[BuiltOutput],
                  attempt: str) -> list[WrittenOutput]:
    """Write each output durably under ``outputs/<study>/<series>/<sop>-<attempt>.dcm``.

    The attempt (job and attempt number) is in the name, so a worker whose lease was
    rescued cannot overwrite a file that another attempt has recorded (and maybe sent).
    """
    written = []
    for output in outputs:
        relative = (f"{OUTPUTS_DIR}/{study_instance_uid}/{output.series_instance_uid}/"
                    f"{output.sop_instance_uid}-{attempt}.dcm")
        write_atomic(root, root / relative, [output.data])
        written.append(WrittenOutput(output, relative, sha256_of(output.data)))
    return written


def superseded_outputs(session: Session, study_instance_uid: str, study_revision: int
                       ) -> list[Output]:
    """Current SR and SC outputs of earlier revisions: what a new analysis replaces."""
    return list(session.scalars(select(Output).where(
        Output.study_instance_uid == study_instance_uid, Output.study_revision < study_revision,
        Output.state == OutputState.CURRENT.value, Output.kind != "kos")))


def read_headers(root: Path, outputs: Sequence[Output]) -> list[Dataset]:
    """The stored headers of ``outputs`` (what a rejection note references)."""
    return [pydicom.dcmread(root / output.path, stop_before_pixels=True) for output in outputs]


def record_outputs(session: Session, written: Sequence[WrittenOutput], *, job_id: int,
                   study_instance_uid: str, study_revision: int, peers: Sequence[PeerSettings],
                   now: datetime) -> list[int]:
    """Record the outputs, supersede older ones, queue deliveries; returns the delivery job ids."""
    if not written:
        return []
    for item in written:
        insert_ignore(session, Output, {
            "sop_instance_uid": item.built.sop_instance_uid,
            "sop_class_uid": item.built.sop_class_uid, "study_instance_uid": study_instance_uid,
            "series_instance_uid": item.built.series_instance_uid,
            "study_revision": study_revision, "job_id": job_id, "kind": item.built.kind,
            "label": item.built.label, "path": item.relative_path, "sha256": item.sha256,
            "size_bytes": len(item.built.data), "state": OutputState.CURRENT.value,
            "created_at": now})
    replaced = session.execute(update(Output).where(
        Output.study_instance_uid == study_instance_uid, Output.study_revision < study_revision,
        Output.state == OutputState.CURRENT.value).values(
        state=OutputState.SUPERSEDED.value, superseded_at=now)).rowcount
    record_event(session, "outputs.written", now=now, study_instance_uid=study_instance_uid,
                 job_id=job_id, count=len(written), superseded=replaced,
                 kinds=sorted({item.built.kind for item in written}))
    jobs = []
    for peer in peers:
        if peer.send_results:
            supersede_older_deliveries(session, study_instance_uid=study_instance_uid,
                                       study_revision=study_revision, peer=peer.name, now=now)
            jobs.append(enqueue_delivery(session, study_instance_uid=study_instance_uid,
                                         study_revision=study_revision, peer=peer.name,
                                         now=now).id)
    return jobs
