"""Keep a job's outputs: durable files, their rows, and the deliveries they need.

Files are written (fsynced, renamed) before the transaction that records them, so a row
never points at a missing file.  In that same transaction the outputs of earlier revisions
of the study are marked superseded and one delivery job per receiving peer is queued, so a
crash leaves either all of it or none (a retry rebuilds the same UIDs and paths).
``dicom_node.outputs`` only builds the objects; everything that touches disk or rows is here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from dicom_node.config.settings import PeerSettings
from dicom_node.db.models import Output, OutputState
from dicom_node.db.upsert import insert_ignore
from dicom_node.events import record_event
from dicom_node.jobs.enqueue import enqueue_delivery, supersede_older_deliveries
from dicom_node.jobs.queue import Lease
from dicom_node.jobs.space import require_free_space
from dicom_node.results import OutputKind
from dicom_node.store import sha256_of, write_atomic

if TYPE_CHECKING:  # the builders pull in highdicom; the records need only their values
    from dicom_node.outputs.build import BuiltOutput

OUTPUTS_DIR = "outputs"


@dataclass(frozen=True)
class WrittenOutput:
    """A built output and where its durable file lies (relative to the storage root)."""

    built: BuiltOutput
    relative_path: str
    sha256: str


def write_outputs(
    root: Path, lease: Lease, outputs: Sequence[BuiltOutput], *, min_free_mb: int
) -> list[WrittenOutput]:
    """Write each output durably under ``outputs/<study>/<series>/<sop>-job<id>a<n>.dcm``.

    The reserve of ``[storage] min_free_mb`` is kept (``InsufficientSpaceError``).  The
    attempt (job and attempt number) is in the name, so a worker whose lease was rescued
    cannot overwrite a file that another attempt has recorded (and maybe sent).
    """
    require_free_space(root, min_free_mb, sum(len(output.data) for output in outputs))
    attempt = f"job{lease.job_id}a{lease.attempt}"
    written = []
    for output in outputs:
        relative = (
            f"{OUTPUTS_DIR}/{lease.study_instance_uid}/{output.series_instance_uid}/"
            f"{output.sop_instance_uid}-{attempt}.dcm"
        )
        write_atomic(root, root / relative, [output.data])
        written.append(WrittenOutput(output, relative, sha256_of(output.data)))
    return written


def superseded_outputs(
    session: Session, study_instance_uid: str, study_revision: int
) -> list[Output]:
    """Current SR and SC outputs of earlier revisions: what a new analysis replaces."""
    return list(
        session.scalars(
            select(Output).where(
                Output.study_instance_uid == study_instance_uid,
                Output.study_revision < study_revision,
                Output.state == OutputState.CURRENT,
                Output.kind != OutputKind.KOS,
            )
        )
    )


def read_headers(root: Path, outputs: Sequence[Output]) -> list[Dataset]:
    """The stored headers of ``outputs`` (what a rejection note references)."""
    return [pydicom.dcmread(root / output.path, stop_before_pixels=True) for output in outputs]


def record_outputs(
    session: Session,
    written: Sequence[WrittenOutput],
    *,
    job_id: int,
    study_instance_uid: str,
    study_revision: int,
    now: datetime,
) -> None:
    """Record the outputs and mark those of earlier revisions superseded."""
    if not written:
        return
    for item in written:
        insert_ignore(
            session,
            Output,
            {
                "sop_instance_uid": item.built.sop_instance_uid,
                "sop_class_uid": item.built.sop_class_uid,
                "study_instance_uid": study_instance_uid,
                "series_instance_uid": item.built.series_instance_uid,
                "study_revision": study_revision,
                "job_id": job_id,
                "kind": item.built.kind,
                "label": item.built.label,
                "path": item.relative_path,
                "sha256": item.sha256,
                "size_bytes": len(item.built.data),
                "state": OutputState.CURRENT.value,
                "created_at": now,
            },
        )
    replaced = cast(
        CursorResult[Any],
        session.execute(
            update(Output)
            .where(
                Output.study_instance_uid == study_instance_uid,
                Output.study_revision < study_revision,
                Output.state == OutputState.CURRENT,
            )
            .values(state=OutputState.SUPERSEDED.value, superseded_at=now)
        ),
    ).rowcount
    record_event(
        session,
        "outputs.written",
        now=now,
        study_instance_uid=study_instance_uid,
        job_id=job_id,
        count=len(written),
        superseded=replaced,
        kinds=sorted({item.built.kind for item in written}),
    )


def queue_deliveries(
    session: Session,
    *,
    study_instance_uid: str,
    study_revision: int,
    peers: Sequence[PeerSettings],
    now: datetime,
) -> list[int]:
    """One delivery job per peer that receives results (older revisions' deliveries to it
    stop); returns the delivery job ids."""
    jobs = []
    for peer in peers:
        if peer.send_results:
            supersede_older_deliveries(
                session,
                study_instance_uid=study_instance_uid,
                study_revision=study_revision,
                peer=peer.name,
                now=now,
            )
            jobs.append(
                enqueue_delivery(
                    session,
                    study_instance_uid=study_instance_uid,
                    study_revision=study_revision,
                    peer=peer.name,
                    now=now,
                ).id
            )
    return jobs
