"""Send stored output files to a peer by C-STORE and classify every answer.

One association per batch (opened by :mod:`dicom_node.scu.association`); every C-STORE
response's status is checked (PS3.4 B.2.3, PS3.7 C).  The answer for each instance is a
:class:`DeliveryOutcome`: ``delivered`` (success, or a warning such as B000/B006/B007,
logged), ``failed`` (transient: A7xx out of resources, 0x0213, no answer) or ``rejected``
(permanent: A9xx, Cxxx, 0x0122 SOP class not supported, 0x0124 not authorised, any other
failure).  When no association can be made the whole batch fails: ``TransientDeliveryError``
(refused, timed out, aborted, transient reject, TLS) or ``DeliveryError`` (permanent reject).
The only other place DIMSE statuses are decided is the SCP handler.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from dicom_node.config.operations import TlsSettings
from dicom_node.config.settings import PeerSettings
from dicom_node.errors import DeliveryError, TlsConfigError, TransientDeliveryError
from dicom_node.scu.association import (
    AssociationRequest,
    NoAssociation,
    accepted_transfer_syntaxes,
    association,
    c_store,
    contexts_for,
)
from dicom_node.scu.tls import peer_tls_args

log = structlog.get_logger(__name__)


class DeliveryOutcome(enum.StrEnum):
    """What became of one instance sent to a peer; the value is what ``deliveries.outcome``
    stores."""

    DELIVERED = "delivered"  # success or warning: the peer holds it
    FAILED = "failed"  # transient: sent again on the job's next attempt
    REJECTED = "rejected"  # permanent: not sent again unless an operator retries the job


DELIVERED, FAILED, REJECTED = (
    DeliveryOutcome.DELIVERED,
    DeliveryOutcome.FAILED,
    DeliveryOutcome.REJECTED,
)
TRANSIENT_FAILURES = (0x0213,)  # resource limitation (PS3.7 C.4.2)
# Explicit VR first; Implicit VR Little Endian for SCPs that take only the default syntax
# (PS3.5 10.1); pynetdicom re-encodes between the two uncompressed syntaxes.
OUTPUT_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class OutgoingFile:
    sop_class_uid: str
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class SendResult:
    """What the peer answered for one instance."""

    sop_instance_uid: str
    outcome: DeliveryOutcome
    status_code: int | None  # None: no answer (or the context was refused)
    detail: str


def classify_status(code: int) -> tuple[DeliveryOutcome, str]:
    """(outcome, detail) of one C-STORE response status."""
    category = code_to_category(code)
    if category == "Success":
        return DELIVERED, "success"
    if category == "Warning":
        return DELIVERED, f"warning 0x{code:04X}"
    if (code & 0xFF00) == 0xA700 or code in TRANSIENT_FAILURES:
        return FAILED, f"out of resources 0x{code:04X}"
    return REJECTED, f"failure 0x{code:04X}"


def send_files(
    files: Sequence[OutgoingFile],
    peer: PeerSettings,
    *,
    calling_ae_title: str,
    timeout: float,
    tls: TlsSettings | None = None,
) -> list[SendResult]:
    """Send ``files`` to ``peer`` over one association; one result per file, in order.

    A peer with ``tls = true`` is reached over DICOM TLS with the ``tls`` settings (None: the
    defaults, i.e. the system CA store and no client certificate); see :mod:`dicom_node.scu.tls`.

    Raises
    ------
    TransientDeliveryError
        No association: connection refused, timed out, aborted, a transient reject, a failed
        TLS handshake or unusable TLS files (retried: an administrator can fix them).
    DeliveryError
        The peer rejected the association permanently (wrong AE title, not authorised).
    """
    try:
        tls_args = peer_tls_args(tls or TlsSettings(), peer)
    except TlsConfigError as exc:
        raise TransientDeliveryError(f"cannot use TLS for peer {peer.name}: {exc}") from None
    request = AssociationRequest(
        calling_ae_title=calling_ae_title,
        called_ae_title=peer.ae_title,
        host=peer.host,
        port=peer.port,
        timeout=timeout,
        tls_args=tls_args,
        contexts=contexts_for(sorted({f.sop_class_uid for f in files}), OUTPUT_TRANSFER_SYNTAXES),
    )
    with association(request) as assoc:
        if isinstance(assoc, NoAssociation):
            raise _association_error(assoc, peer)
        return [_send_one(assoc, item) for item in files]


def _send_one(assoc: Association, item: OutgoingFile) -> SendResult:
    syntaxes = accepted_transfer_syntaxes(assoc, item.sop_class_uid)
    if not syntaxes:
        return SendResult(
            item.sop_instance_uid, REJECTED, None, "the peer did not accept this SOP class"
        )
    if not assoc.is_established:
        return SendResult(item.sop_instance_uid, FAILED, None, "association ended early")
    if not item.path.is_file():
        return SendResult(
            item.sop_instance_uid,
            REJECTED,
            None,
            "the output file is missing from the storage root",
        )
    # Outputs are stored in Explicit VR Little Endian: sent from the file as they are, or
    # read and re-encoded by pynetdicom when the peer chose Implicit VR.
    message = item.path if ExplicitVRLittleEndian in syntaxes else pydicom.dcmread(item.path)
    code = c_store(assoc, message)
    if code is None:  # no response: timeout or abort (PS3.7 C.1: no status)
        return SendResult(item.sop_instance_uid, FAILED, None, "no response from the peer")
    outcome, detail = classify_status(code)
    if outcome == DELIVERED and code:
        log.warning(
            "delivery.warning_status",
            sop_instance_uid=item.sop_instance_uid,
            status=f"0x{code:04X}",
        )
    return SendResult(item.sop_instance_uid, outcome, code, detail)


def _association_error(refused: NoAssociation, peer: PeerSettings) -> DeliveryError:
    where = f"{peer.name} ({peer.ae_title}@{peer.host}:{peer.port})"
    if refused.tls_error is not None:
        return TransientDeliveryError(f"TLS handshake with {where} failed: {refused.tls_error}")
    if refused.rejected:
        if refused.permanent:  # PS3.8 9.3.4: rejected-permanent
            return DeliveryError(f"association rejected permanently by {where}: {refused.reason}")
        return TransientDeliveryError(
            f"association rejected (transient) by {where}: {refused.reason}"
        )
    if refused.accepted:  # accepted, but none of our presentation contexts (like 0x0122)
        return DeliveryError(f"{where} accepted none of the output SOP classes")
    if not refused.answered:
        return TransientDeliveryError(f"no answer from {where} (connection refused or timed out)")
    return TransientDeliveryError(f"association aborted by {where}")
