"""Send stored output files to a peer by C-STORE and classify every answer.

One association per batch; every C-STORE response's status is checked (PS3.4 B.2.3,
PS3.7 C).  The answer for each instance is one of: ``delivered`` (success, or a warning such
as B000/B006/B007, logged), ``failed`` (transient: A7xx out of resources, 0x0213, no answer)
or ``rejected`` (permanent: A9xx, Cxxx, 0x0122 SOP class not supported, 0x0124 not
authorised, any other failure).  When no association can be made the whole batch fails:
``TransientDeliveryError`` (refused, timed out, aborted, transient reject) or
``DeliveryError`` (permanent reject).  The only other place DIMSE statuses appear is the SCP
handler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.status import code_to_category
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.config.settings import PeerSettings
from dicom_node.config.operations import TlsSettings
from dicom_node.errors import DeliveryError, TlsConfigError, TransientDeliveryError
from dicom_node.scu.tls import handshake_error, peer_tls_args

log = structlog.get_logger(__name__)

DELIVERED, FAILED, REJECTED = "delivered", "failed", "rejected"
TRANSIENT_FAILURES = (0x0213,)      # resource limitation (PS3.7 C.4.2)


@dataclass(frozen=True)
class OutgoingFile:
    sop_class_uid: str
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class SendResult:
    """What the peer answered for one instance."""

    sop_instance_uid: str
    outcome: str                 # delivered, failed or rejected
    status_code: int | None      # None: no answer (or the context was refused)
    detail: str


def classify_status(code: int) -> tuple[str, str]:
    """(outcome, detail) of one C-STORE response status."""
    category = code_to_category(code)
    if category == "Success":
        return DELIVERED, "success"
    if category == "Warning":
        return DELIVERED, f"warning 0x{code:04X}"
    if (code & 0xFF00) == 0xA700 or code in TRANSIENT_FAILURES:
        return FAILED, f"out of resources 0x{code:04X}"
    return REJECTED, f"failure 0x{code:04X}"


def send_files(files: Sequence[OutgoingFile], peer: PeerSettings, *, calling_ae_title: str,
               timeout: float, tls: TlsSettings | None = None) -> list[SendResult]:
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
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in sorted({f.sop_class_uid for f in files}):
        # Explicit VR first; Implicit VR Little Endian for SCPs that take only the default
        # syntax (PS3.5 10.1); pynetdicom re-encodes between the two uncompressed syntaxes.
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    answers: list[A_ASSOCIATE] = []
    handlers = [(evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))]
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=handlers,
                         tls_args=tls_args)
    if not assoc.is_established:
        raise _association_error(assoc, answers, peer, handshake_error(tls_args))
    try:
        return [_send_one(assoc, item) for item in files]
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _send_one(assoc, item: OutgoingFile) -> SendResult:
    syntaxes = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                if cx.abstract_syntax == item.sop_class_uid]
    if not syntaxes:
        return SendResult(item.sop_instance_uid, REJECTED, None,
                          "the peer did not accept this SOP class")
    if not assoc.is_established:
        return SendResult(item.sop_instance_uid, FAILED, None, "association ended early")
    if not item.path.is_file():
        return SendResult(item.sop_instance_uid, REJECTED, None,
                          "the output file is missing from the storage root")
    # Outputs are stored in Explicit VR Little Endian: sent from the file as they are, or
    # read and re-encoded by pynetdicom when the peer chose Implicit VR.
    message = item.path if ExplicitVRLittleEndian in syntaxes else pydicom.dcmread(item.path)
    status = assoc.send_c_store(message)
    if "Status" not in status:  # no response: timeout or abort (PS3.7 C.1: no status)
        return SendResult(item.sop_instance_uid, FAILED, None, "no response from the peer")
    code = int(status.Status)
    outcome, detail = classify_status(code)
    if outcome == DELIVERED and code:
        log.warning("delivery.warning_status", sop_instance_uid=item.sop_instance_uid,
                    status=f"0x{code:04X}")
    return SendResult(item.sop_instance_uid, outcome, code, detail)


def _association_error(assoc, answers: list, peer: PeerSettings,
                       tls_error: str | None = None) -> DeliveryError:
    where = f"{peer.name} ({peer.ae_title}@{peer.host}:{peer.port})"
    if tls_error is not None:
        return TransientDeliveryError(f"TLS handshake with {where} failed: {tls_error}")
    results = [getattr(a, "result", None) for a in answers]
    if assoc.is_rejected:
        reason = next((a.reason_str for a in answers if getattr(a, "result", None)), "")
        if 0x01 in results:  # PS3.8 9.3.4: rejected-permanent
            return DeliveryError(f"association rejected permanently by {where}: {reason}")
        return TransientDeliveryError(f"association rejected (transient) by {where}: {reason}")
    if 0x00 in results:  # accepted, but none of our presentation contexts (like 0x0122)
        return DeliveryError(f"{where} accepted none of the output SOP classes")
    if not answers:
        return TransientDeliveryError(f"no answer from {where} (connection refused or timed out)")
    return TransientDeliveryError(f"association aborted by {where}")
