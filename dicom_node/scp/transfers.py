"""What each association transferred in, for the ``instances.received`` audit rows.

The C-STORE path only notes, in memory, which study each request belonged to and whether
it was answered with success; the audit rows (one per study of the association, PS3.15
A.5.3.3 "DICOM Instances Transferred") are written when the association ends, released or
aborted, after the last C-STORE response has gone out.  So auditing never delays or changes
a C-STORE response, and a failed audit write is logged and counted, not raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from pydicom.dataset import Dataset
from pynetdicom.events import Event

from dicom_node.audit.atna import record_instances_received
from dicom_node.header import InstanceHeader
from dicom_node.uids import is_valid_uid

if TYPE_CHECKING:
    from dicom_node.scp.handlers import ScpContext

log = structlog.get_logger(__name__)


@dataclass
class StudyTransfer:
    """One study's instances within one association."""

    patient_id: str | None
    instances: int = 0
    failed: int = 0


@dataclass
class AssociationTransfers:
    """Everything one association sent us, by study (None: requests with no readable study)."""

    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    studies: dict[str | None, StudyTransfer] = field(default_factory=dict)
    current: tuple[str, str | None] | None = None  # the request being handled: study, patient


class TransferLog:
    """Per-association tallies, shared by the SCP's association threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Any, AssociationTransfers] = {}
        self.not_recorded = 0  # audit rows that could not be written (database down)

    def _entry(self, assoc: Any) -> AssociationTransfers:
        entry = self._open.get(assoc)
        if entry is None:
            request = assoc.requestor
            entry = AssociationTransfers(
                str(request.ae_title).strip(),
                str(assoc.acceptor.ae_title).strip(),
                str(request.address),
            )
            self._open[assoc] = entry
        return entry

    def identify(self, assoc: Any, header: InstanceHeader) -> None:
        """The C-STORE now being handled on ``assoc`` is of this study and patient."""
        study = header.study_instance_uid
        with self._lock:
            self._entry(assoc).current = (
                (study, header.patient_id or None) if is_valid_uid(study) else None
            )

    def answered(self, assoc: Any, status: int) -> None:
        """The C-STORE on ``assoc`` was answered with ``status`` (0x0000: success)."""
        with self._lock:
            entry = self._entry(assoc)
            study, patient_id = entry.current or (None, None)
            entry.current = None
            tally = entry.studies.setdefault(study, StudyTransfer(patient_id))
            if status == 0x0000:
                tally.instances += 1
            else:
                tally.failed += 1

    def finish(self, assoc: Any) -> AssociationTransfers | None:
        """The association's tallies, removed (None if it stored nothing, or was seen)."""
        with self._lock:
            return self._open.pop(assoc, None)

    def count_not_recorded(self) -> None:
        with self._lock:
            self.not_recorded += 1


def handle_store_noted(
    event: Event, ctx: ScpContext, store: Callable[[Event, ScpContext], Dataset]
) -> Dataset:
    """Run the C-STORE handler ``store``, then note its answer for the audit trail."""
    response = store(event, ctx)
    try:
        ctx.transfers.answered(event.assoc, int(response.Status))
    except Exception as exc:  # bookkeeping must never change the answer
        log.error("audit.transfer_not_noted", error_type=type(exc).__name__)
    return response


def handle_association_ended(event: Event, ctx: ScpContext) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: write the association's rows, once."""
    assoc = event.assoc
    try:
        ended = ctx.transfers.finish(assoc)
        if ended is None:
            return
        how = _how_it_ended(event)
        for study, tally in ended.studies.items():
            if not record_instances_received(
                ctx.session_factory,
                study_instance_uid=study,
                patient_id=tally.patient_id,
                instances=tally.instances,
                failed=tally.failed,
                calling_ae_title=ended.calling_ae_title,
                called_ae_title=ended.called_ae_title,
                peer_address=ended.peer_address,
                association=how,
            ):
                ctx.transfers.count_not_recorded()
    except Exception as exc:  # a handler's exception would only be logged by pynetdicom
        log.error("audit.transfer_not_recorded", error_type=type(exc).__name__)


def _how_it_ended(event: Event) -> str:
    """released, aborted or closed.  On an A-ABORT the DUL closes the connection (and fires
    EVT_CONN_CLOSE) before the association thread sees the abort, so the ACSE's queue of
    received primitives is asked as well (PS3.8 9.2, action AA-3)."""
    assoc = event.assoc
    if assoc.is_released or event.event.name == "EVT_RELEASED":
        return "released"
    if assoc.is_aborted or event.event.name == "EVT_ABORTED" or assoc.acse.is_aborted():
        return "aborted"
    return "closed"
