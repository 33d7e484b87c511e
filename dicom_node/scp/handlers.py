"""pynetdicom event handlers: association policy, C-ECHO and the durable C-STORE.

This is the SCP's edge of the error tree (``dicom_node.errors``): every exception in a C-STORE
becomes an explicit PS3.4 B.2.3 status through :data:`DIMSE_STATUS`, the one table of it,
never pynetdicom's generic 0xC211.  The handler persists bytes and rows and returns; it never
decodes pixels or runs analysis: :func:`dicom_node.ingest.accept_instance`, which STOW-RS
shares, does the storing; the table gives a STOW-RS instance its Failure Reason too.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BytesIO
from types import MappingProxyType
from typing import cast

import structlog
from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicom_node.audit.atna import record_security_alert
from dicom_node.errors import (
    InflationLimitError,
    InsufficientSpaceError,
    InvalidInstanceError,
    SopMismatchError,
    StorageError,
    StudyMismatchError,
    UnsupportedSopClassError,
    UnsupportedTransferSyntaxError,
)
from dicom_node.header import InstanceHeader
from dicom_node.ingest import (
    SUCCESS,
    IngestContext,
    accept_instance,
    read_instance_header,
    record_safely,
)
from dicom_node.scp.backlog import BacklogGauge, refuse_if_backlogged
from dicom_node.scp.transfers import TransferLog

log = structlog.get_logger(__name__)

# PS3.4 B.2.3 C-STORE statuses used by the node (PS3.7 C: their classes), which are also the
# STOW-RS Failure Reasons (PS3.18 Table I.2-2), and the STOW-RS-only reasons.
OUT_OF_RESOURCES = 0xA700  # Refused: the sender retries later
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: for good
CANNOT_UNDERSTAND = 0xC000  # Error: for good
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported (PS3.7 Annex C)
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # STOW only (PS3.18 Table I.2-2)
STUDY_INSTANCE_UID_MISMATCH = 0xC409  # STOW only: implementation-specific (as dcm4chee's)


@dataclass(frozen=True)
class StoreAnswer:
    """The C-STORE-RSP of a refused data set: its status and Error Comment (0000,0902)."""

    status: int
    comment: str


# The one translation from an exception in a C-STORE (or in storing a STOW-RS instance) to its
# status.  Looked up along the exception's MRO, so the most specific class decides
# (InflationLimitError before its base InvalidInstanceError; TransferSyntaxMismatchError is an
# InvalidInstanceError: 0xC000).  The ``Exception`` row is a bug: it must not become 0xC211 or
# lose the sender's data, so the sender is told to retry.
DIMSE_STATUS: Mapping[type[BaseException], StoreAnswer] = MappingProxyType(
    {
        InsufficientSpaceError: StoreAnswer(OUT_OF_RESOURCES, "storage full"),
        StorageError: StoreAnswer(OUT_OF_RESOURCES, "storage or database unavailable"),
        SopMismatchError: StoreAnswer(DATASET_DOES_NOT_MATCH_SOP_CLASS, "UIDs differ from command"),
        UnsupportedSopClassError: StoreAnswer(SOP_CLASS_NOT_SUPPORTED, "SOP class not accepted"),
        UnsupportedTransferSyntaxError: StoreAnswer(
            TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer syntax not supported"
        ),
        StudyMismatchError: StoreAnswer(
            STUDY_INSTANCE_UID_MISMATCH, "instance of another study than the request's"
        ),
        InflationLimitError: StoreAnswer(
            OUT_OF_RESOURCES, "deflated data set inflates beyond the limit"
        ),
        InvalidInstanceError: StoreAnswer(CANNOT_UNDERSTAND, "cannot understand data set"),
        Exception: StoreAnswer(OUT_OF_RESOURCES, "internal error; retry later"),
    }
)


def dimse_status_for(exc: Exception) -> StoreAnswer:
    """The C-STORE answer to a data set whose storing raised ``exc`` (see :data:`DIMSE_STATUS`)."""
    for cls in type(exc).__mro__:
        if cls in DIMSE_STATUS:
            return DIMSE_STATUS[cls]
    return DIMSE_STATUS[Exception]


@dataclass(kw_only=True)
class ScpContext(IngestContext):
    """What the handlers need, built once per process and passed in (no module state): what
    accepting an instance needs (shared with a web role's STOW-RS), and the SCP's own parts."""

    peer_addresses: dict[str, frozenset[str]]  # calling AE title -> allowed IP addresses
    backlog: BacklogGauge = field(default_factory=BacklogGauge)  # [scp] max_backlog
    transfers: TransferLog = field(default_factory=TransferLog)  # for instances.received


def handle_requested(event: Event, ctx: ScpContext) -> None:
    """Reject (A-ASSOCIATE-RJ, PS3.8 7.1.1.9) associations not from a configured peer."""
    # EVT_REQUESTED fires once the A-ASSOCIATE-RQ is received, so the primitive is set
    request = cast(A_ASSOCIATE, event.assoc.requestor.primitive)
    calling = str(request.calling_ae_title).strip()
    called = str(request.called_ae_title).strip()
    address = event.assoc.requestor.address
    reason, diagnostic = None, 0
    if called != ctx.settings.node.ae_title.strip():
        reason, diagnostic = "called AE title is not ours", 0x07
    elif calling not in ctx.peer_addresses:
        reason, diagnostic = "calling AE title is not a configured peer", 0x03
    elif address not in ctx.peer_addresses[calling]:
        reason, diagnostic = "calling AE title is not allowed from this address", 0x03
    if reason is None:
        refuse_if_backlogged(event, ctx)  # a known peer, but the analysis queue is too long
        return
    # Result 0x01 rejected-permanent, source 0x01 DUL service-user (PS3.8 Table 9-21).
    event.assoc.acse.send_reject(0x01, 0x01, diagnostic)
    # As pynetdicom's own rejections do: wait for the DUL to send the A-ASSOCIATE-RJ and stop,
    # so the server does not close the socket under a PDU still in its queue.
    event.assoc.kill()
    log.warning(
        "association.rejected",
        calling_ae_title=calling,
        called_ae_title=called,
        peer_address=address,
        reason=reason,
    )
    record_safely(
        ctx.session_factory,
        "association.rejected",
        level="warning",
        calling_ae_title=calling,
        called_ae_title=called,
        peer_address=address,
        reason=reason,
    )
    record_security_alert(
        ctx.session_factory,
        reason="association_rejected",
        cause=reason,
        calling_ae_title=calling,
        called_ae_title=called,
        peer_address=address,
    )


def handle_echo(event: Event, ctx: ScpContext) -> int:
    """C-ECHO (PS3.7 9.1.5): always success once the association is accepted."""
    log.debug("echo.received", calling_ae_title=event.assoc.requestor.ae_title)
    return SUCCESS


def handle_store_counted(event: Event, ctx: ScpContext) -> Dataset:
    """:func:`handle_store`, counting each answer by status (``dicom_node_cstore_responses``)."""
    response = handle_store(event, ctx)
    ctx.metrics.cstore_response(int(response.Status))
    return response


def handle_store(event: Event, ctx: ScpContext) -> Dataset:
    """Persist one C-STORE data set durably, then answer (PS3.4 B.2.3).

    pynetdicom sends the C-STORE-RSP only after this returns, so success is returned only
    after the file is fsynced and renamed and its row committed.  Everything is decided on
    the received bytes before anything is written (``event.dataset`` is never used: pydicom
    would inflate a Deflated data set whole, without a bound):

    * a Deflated data set (PS3.5 A.5) that inflates beyond ``[scp] max_inflated_mb`` gets
      0xA700 Out of Resources (PS3.4 B.2.3; inflation stops at the cap);
    * a data set not encoded in its presentation context's transfer syntax (Explicit VR
      bytes on an Implicit VR context, PS3.5 7.1) gets 0xC000 Cannot Understand, like any
      data set that cannot be parsed.
    """
    calling = str(event.assoc.requestor.ae_title).strip()
    with structlog.contextvars.bound_contextvars(calling_ae_title=calling):
        try:
            return _status(_store(event, ctx, calling))
        except Exception as exc:  # every exception is answered through DIMSE_STATUS
            return _refuse(exc)


def _store(event: Event, ctx: ScpContext, calling: str) -> int:
    # EVT_C_STORE's request is a C-STORE-RQ, which always carries a data set (PS3.7 9.1.1.1)
    request = cast(C_STORE, event.request)
    stream = cast(BytesIO, request.DataSet).getvalue()  # the data set exactly as received
    header = read_instance_header(ctx, stream, str(event.context.transfer_syntax))
    ctx.transfers.identify(event.assoc, header)  # for the association's audit row
    _check_command_matches(event, header)
    # PS3.10 7.1: 128-byte preamble, "DICM", then the File Meta Information group.
    meta = b"\0" * 128 + b"DICM" + encode_file_meta(event.file_meta)
    return accept_instance(ctx, header, stream, [meta, stream], calling)


def _check_command_matches(event: Event, header: InstanceHeader) -> None:
    request = cast(C_STORE, event.request)  # called for EVT_C_STORE only
    if str(request.AffectedSOPClassUID) != header.sop_class_uid:
        raise SopMismatchError("Affected SOP Class UID differs from the data set's SOP Class UID")
    if str(request.AffectedSOPInstanceUID) != header.sop_instance_uid:
        raise SopMismatchError(
            "Affected SOP Instance UID differs from the data set's SOP Instance UID"
        )


def _refuse(exc: Exception) -> Dataset:
    """The answer :data:`DIMSE_STATUS` gives ``exc``, logged (a bug with its stack only)."""
    answer = dimse_status_for(exc)
    if answer is DIMSE_STATUS[Exception]:
        log.error(
            "store.internal_error",
            error_type=type(exc).__name__,
            stack="".join(traceback.format_tb(exc.__traceback__)),
        )
    else:
        log.warning("store.refused", status=f"0x{answer.status:04X}", reason=str(exc))
    return _status(answer.status, answer.comment)


def _status(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]  # (0000,0902) LO
    return status
