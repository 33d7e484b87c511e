"""pynetdicom event handlers: association policy, C-ECHO and the durable C-STORE.

This is the SCP's edge of the error tree (``dicom_node.errors``): every exception in a C-STORE
becomes an explicit PS3.4 B.2.3 status through :data:`DIMSE_STATUS`, the one table of it,
never pynetdicom's generic 0xC211.  The handler persists bytes and rows and returns; it never
decodes pixels or runs analysis.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import structlog
from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.atna import record_security_alert
from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.session import session_scope
from dicom_node.errors import (
    InflationLimitError,
    InsufficientSpaceError,
    InvalidInstanceError,
    SopMismatchError,
    StorageError,
)
from dicom_node.events import record_event
from dicom_node.header import InstanceHeader, read_header
from dicom_node.inflate import MEGABYTE
from dicom_node.ops.metrics.collect import NodeMetrics
from dicom_node.scp.backlog import BacklogGauge, refuse_if_backlogged
from dicom_node.scp.transfers import TransferLog
from dicom_node.store import StoredFile, instance_relative_path, put_instance, sha256_of
from dicom_node.studies import find_instance, record_instance
from dicom_node.uids import is_valid_uid

log = structlog.get_logger(__name__)

# PS3.4 B.2.3 C-STORE statuses used by the node (PS3.7 C: their classes).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: the sender retries later
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: for good
CANNOT_UNDERSTAND = 0xC000  # Error: for good
_LOCK_STRIPES = 64


@dataclass(frozen=True)
class StoreAnswer:
    """The C-STORE-RSP of a refused data set: its status and Error Comment (0000,0902)."""

    status: int
    comment: str


# The one translation from an exception in a C-STORE to its status.  Looked up along the
# exception's MRO, so the most specific class decides (InflationLimitError before its base
# InvalidInstanceError; TransferSyntaxMismatchError is an InvalidInstanceError: 0xC000).  The
# ``Exception`` row is a bug: it must not become 0xC211 or lose the sender's data, so the
# sender is told to retry.
DIMSE_STATUS: Mapping[type[BaseException], StoreAnswer] = MappingProxyType(
    {
        InsufficientSpaceError: StoreAnswer(OUT_OF_RESOURCES, "storage full"),
        StorageError: StoreAnswer(OUT_OF_RESOURCES, "storage or database unavailable"),
        SopMismatchError: StoreAnswer(DATASET_DOES_NOT_MATCH_SOP_CLASS, "UIDs differ from command"),
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


@dataclass
class ScpContext:
    """What the handlers need, built once per process and passed in (no module state)."""

    settings: Settings
    session_factory: sessionmaker[Session]
    storage_root: Path
    analysed_sop_classes: frozenset[str]
    peer_addresses: dict[str, frozenset[str]]  # calling AE title -> allowed IP addresses
    hash_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256")
    )
    locks: list[threading.Lock] = field(
        default_factory=lambda: [threading.Lock() for _ in range(_LOCK_STRIPES)]
    )
    backlog: BacklogGauge = field(default_factory=BacklogGauge)  # [scp] max_backlog
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
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
    _record_safely(
        ctx,
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
    header = read_header(
        stream,
        str(event.context.transfer_syntax),
        max_inflated_bytes=ctx.settings.scp.max_inflated_mb * MEGABYTE,
    )
    ctx.transfers.identify(event.assoc, header)  # for the association's audit row
    _check_command_matches(event, header)
    if header.sop_class_uid not in ctx.analysed_sop_classes:
        return _discard(ctx, header, calling)
    relative_path = instance_relative_path(
        header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    # Hash on the pool while this thread writes: both release the GIL for large buffers.
    digest_future = ctx.hash_pool.submit(sha256_of, stream)
    stripe = ctx.locks[hash(header.sop_instance_uid) % len(ctx.locks)]
    with stripe:
        existing = _lookup(ctx, header.sop_instance_uid)
        if existing is not None:
            return _duplicate(ctx, header, existing, digest_future.result(), calling)
        # PS3.10 7.1: 128-byte preamble, "DICM", then the File Meta Information group.
        meta = b"\0" * 128 + b"DICM" + encode_file_meta(event.file_meta)
        size, relative_path = put_instance(
            ctx.storage_root,
            [meta, stream],
            relative_path,
            min_free_mb=ctx.settings.storage.min_free_mb,
        )
        stored = StoredFile(relative_path, digest_future.result(), size)
        revision = _commit(ctx, header, stored, calling)
        if revision is None:  # another node committed this instance meanwhile (scale-out)
            # Ours, unless another node's start-up reconciliation adopted this very file.
            if _held_path(ctx, header.sop_instance_uid) != relative_path:
                (ctx.storage_root / relative_path).unlink(missing_ok=True)  # no row names it
            existing = _lookup(ctx, header.sop_instance_uid)
            if existing is None:  # and it is gone again: let the sender retry
                raise StorageError("the instance changed while it was stored")
            return _duplicate(ctx, header, existing, stored.sha256, calling)
    ctx.metrics.instance_stored(header.sop_class_uid, stored.size_bytes)
    log.info(
        "instance.stored",
        study_instance_uid=header.study_instance_uid,
        sop_instance_uid=header.sop_instance_uid,
        study_revision=revision,
        size_bytes=stored.size_bytes,
        transfer_syntax_uid=header.transfer_syntax_uid,
    )
    return SUCCESS


def _check_command_matches(event: Event, header: InstanceHeader) -> None:
    request = cast(C_STORE, event.request)  # called for EVT_C_STORE only
    if str(request.AffectedSOPClassUID) != header.sop_class_uid:
        raise SopMismatchError("Affected SOP Class UID differs from the data set's SOP Class UID")
    if str(request.AffectedSOPInstanceUID) != header.sop_instance_uid:
        raise SopMismatchError(
            "Affected SOP Instance UID differs from the data set's SOP Instance UID"
        )


@contextlib.contextmanager
def _database(ctx: ScpContext) -> Iterator[Session]:
    """One transaction; a database failure becomes StorageError (0xA700, the sender retries)."""
    try:
        with session_scope(ctx.session_factory) as session:
            yield session
    except SQLAlchemyError as exc:
        raise StorageError(f"database unavailable ({type(exc).__name__})") from exc


def _lookup(ctx: ScpContext, sop_instance_uid: str) -> tuple[str, str] | None:
    with _database(ctx) as session:
        row = find_instance(session, sop_instance_uid)
        # A row whose file retention purged is not held: the instance is stored again.
        if row is None or row.purged_at is not None:
            return None
        return (row.sha256, row.study_instance_uid)


def _held_path(ctx: ScpContext, sop_instance_uid: str) -> str | None:
    """The file the committed row of ``sop_instance_uid`` names, if any
    (``dicom_node.ops.reconcile``)."""
    with _database(ctx) as session:
        row = find_instance(session, sop_instance_uid)
        return row.path if row is not None else None


def _commit(
    ctx: ScpContext, header: InstanceHeader, stored: StoredFile, calling: str
) -> int | None:
    # On failure the file stays as an unacknowledged leftover (no row names it); the sender's
    # retry stores its copy beside it.
    with _database(ctx) as session:
        return record_instance(session, header, stored, calling_ae_title=calling, now=utcnow())


def _duplicate(
    ctx: ScpContext, header: InstanceHeader, existing: tuple[str, str], digest: str, calling: str
) -> int:
    if existing[0] == digest:
        log.info(
            "instance.duplicate",
            sop_instance_uid=header.sop_instance_uid,
            study_instance_uid=header.study_instance_uid,
        )
        return SUCCESS
    # Keep the first acknowledged copy; the sender gets success so it does not retry forever,
    # and the conflict is on record for the administrator.
    log.warning(
        "instance.conflict",
        sop_instance_uid=header.sop_instance_uid,
        study_instance_uid=header.study_instance_uid,
    )
    _record_safely(
        ctx,
        "instance.conflict",
        level="warning",
        study_instance_uid=header.study_instance_uid,
        sop_instance_uid=header.sop_instance_uid,
        calling_ae_title=calling,
        kept_sha256=existing[0],
        refused_sha256=digest,
    )
    return SUCCESS


def _discard(ctx: ScpContext, header: InstanceHeader, calling: str) -> int:
    """Accept and drop a storage SOP class the node does not analyse, leaving a record."""
    study = header.study_instance_uid if is_valid_uid(header.study_instance_uid) else None
    sop = header.sop_instance_uid if is_valid_uid(header.sop_instance_uid) else None
    log.info(
        "instance.discarded",
        sop_class_uid=header.sop_class_uid,
        study_instance_uid=study,
        sop_instance_uid=sop,
    )
    with _database(ctx) as session:
        record_event(
            session,
            "instance.discarded",
            now=utcnow(),
            study_instance_uid=study,
            sop_instance_uid=sop,
            sop_class_uid=header.sop_class_uid[:64],
            calling_ae_title=calling,
            reason="SOP class not analysed",
        )
    return SUCCESS


def _record_safely(ctx: ScpContext, name: str, level: str, **detail: Any) -> None:
    """Record an event where failing to record must not change the DICOM outcome."""
    study = detail.pop("study_instance_uid", None)
    sop = detail.pop("sop_instance_uid", None)
    try:
        with session_scope(ctx.session_factory) as session:
            record_event(
                session,
                name,
                now=utcnow(),
                level=level,
                study_instance_uid=study,
                sop_instance_uid=sop,
                **detail,
            )
    except SQLAlchemyError as exc:
        log.error("event.not_recorded", name=name, error_type=type(exc).__name__)


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
