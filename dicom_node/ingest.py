"""Accept one received instance durably: the path C-STORE (the SCP) and STOW-RS (the web role)
share, so both give an instance the same gating, identifier checks, duplicate handling,
durability and study assembly.

:func:`read_instance_header` reads the identity from the received data set bytes (bounded
inflation, the encoding checked against the transfer syntax); the caller then checks the UIDs
its protocol carries beside the data set (C-STORE command, PS3.10 File Meta) and calls
:func:`accept_instance`, which returns ``SUCCESS`` only after the file is fsynced and renamed
and its row committed.  Failures are raised as ``dicom_node.errors`` classes; each edge turns
them into its answer with ``dicom_node.scp.handlers.DIMSE_STATUS`` (a C-STORE status, or the
same value as a STOW-RS Failure Reason, PS3.18 I.2.2).  Nothing here decodes pixels.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at runtime
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.session import read_scope, session_scope
from dicom_node.errors import StorageError, UnsupportedSopClassError
from dicom_node.events import record_event
from dicom_node.header import InstanceHeader, read_header
from dicom_node.inflate import MEGABYTE
from dicom_node.ops.metrics.collect import NodeMetrics
from dicom_node.store import (
    DurableFolders,
    StoredFile,
    instance_relative_path,
    put_instance,
    sha256_of,
)
from dicom_node.studies import find_instance, record_instance
from dicom_node.uids import is_valid_uid

log = structlog.get_logger(__name__)

SUCCESS = 0x0000
LOCK_STRIPES = 64
ANALYSED_SOP_CLASSES = frozenset(
    {
        str(ComputedRadiographyImageStorage),
        str(DigitalXRayImageStorageForPresentation),
        str(DigitalXRayImageStorageForProcessing),
        str(SecondaryCaptureImageStorage),
    }
)


def discarded_sop_classes(settings: Settings) -> frozenset[str]:
    """The storage SOP classes accepted and dropped (``[scp] other_sop_classes = "discard"``):
    every one pynetdicom knows but the analysed ones; none with ``"reject"``."""
    if settings.scp.other_sop_classes != "discard":
        return frozenset()
    every = {str(context.abstract_syntax) for context in AllStoragePresentationContexts}
    return frozenset(every - ANALYSED_SOP_CLASSES)


@dataclass
class IngestContext:
    """What accepting an instance needs, built once per process (no module state).  The SCP's
    context extends it; a web role in the same process shares the SCP's (one set of locks)."""

    settings: Settings
    session_factory: sessionmaker[Session]
    storage_root: Path
    analysed_sop_classes: frozenset[str]
    discarded_sop_classes: frozenset[str] = frozenset()
    hash_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256")
    )
    locks: list[threading.Lock] = field(
        default_factory=lambda: [threading.Lock() for _ in range(LOCK_STRIPES)]
    )
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    durable_folders: DurableFolders = field(default_factory=DurableFolders)


def ingest_context(
    settings: Settings, session_factory: sessionmaker[Session], metrics: NodeMetrics | None = None
) -> IngestContext:
    """The context for ``settings``: its storage root and the SOP classes it analyses or drops."""
    return IngestContext(
        settings=settings,
        session_factory=session_factory,
        storage_root=Path(settings.storage.root),
        analysed_sop_classes=ANALYSED_SOP_CLASSES,
        discarded_sop_classes=discarded_sop_classes(settings),
        metrics=metrics or NodeMetrics(),
    )


def read_instance_header(
    ctx: IngestContext, dataset: bytes, transfer_syntax_uid: str
) -> InstanceHeader:
    """The header of a received data set (``dicom_node.header.read_header``), a Deflated one
    inflated to at most ``[scp] max_inflated_mb``."""
    return read_header(
        dataset,
        transfer_syntax_uid,
        max_inflated_bytes=ctx.settings.scp.max_inflated_mb * MEGABYTE,
    )


def accept_instance(
    ctx: IngestContext,
    header: InstanceHeader,
    dataset: bytes,
    file_chunks: Sequence[bytes],
    calling: str,
) -> int:
    """Store one instance durably and add it to its study; returns ``SUCCESS``.

    ``dataset`` is the data set as received (its SHA-256 detects duplicates, whichever
    protocol brought either copy); ``file_chunks`` are the PS3.10 file to write, ``dataset``
    last.  ``calling`` names the sender in the rows (an AE title, at most 16 characters).
    A SOP class the node does not analyse is accepted and dropped with an event, or refused.
    A second copy of a held instance is success (a conflicting one is kept out, on record).

    Raises
    ------
    UnsupportedSopClassError
        The SOP class is neither analysed nor one to discard.
    InvalidInstanceError
        A UID cannot name a file (PS3.5 9.1).
    StorageError
        The disk or the database failed (InsufficientSpaceError: below min_free_mb).
    """
    if header.sop_class_uid not in ctx.analysed_sop_classes:
        if header.sop_class_uid in ctx.discarded_sop_classes:
            return _discard(ctx, header, calling)
        raise UnsupportedSopClassError("the node neither analyses nor accepts this SOP class")
    relative_path = instance_relative_path(
        header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    # Hash on the pool while this thread writes: both release the GIL for large buffers.
    digest_future = ctx.hash_pool.submit(sha256_of, dataset)
    stripe = ctx.locks[hash(header.sop_instance_uid) % len(ctx.locks)]
    with stripe:
        existing = _lookup(ctx, header.sop_instance_uid)
        if existing is not None:
            return _duplicate(ctx, header, existing, digest_future.result(), calling)
        written = _write_and_commit(ctx, header, file_chunks, relative_path, digest_future, calling)
        if written is None:
            return SUCCESS  # a duplicate of a copy another node committed meanwhile
    revision, stored = written
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


def _write_and_commit(
    ctx: IngestContext,
    header: InstanceHeader,
    file_chunks: Sequence[bytes],
    relative_path: str,
    digest_future: Future[str],
    calling: str,
) -> tuple[int, StoredFile] | None:
    """Write the file (fsync, rename), commit its rows; the study revision and the file, or
    None when another node committed the instance meanwhile (then answered as a duplicate)."""
    size, relative_path = put_instance(
        ctx.storage_root,
        file_chunks,
        relative_path,
        min_free_mb=ctx.settings.storage.min_free_mb,
        durable=ctx.durable_folders,
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
        _duplicate(ctx, header, existing, stored.sha256, calling)
        return None
    return revision, stored


@contextlib.contextmanager
def _database(ctx: IngestContext, *, read_only: bool = False) -> Iterator[Session]:
    """One transaction (``read_only``: one that takes no write lock on SQLite); a database
    failure becomes StorageError (0xA700, the sender retries)."""
    scope = read_scope if read_only else session_scope
    try:
        with scope(ctx.session_factory) as session:
            yield session
    except SQLAlchemyError as exc:
        raise StorageError(f"database unavailable ({type(exc).__name__})") from exc


def _lookup(ctx: IngestContext, sop_instance_uid: str) -> tuple[str, str] | None:
    # A write transaction on purpose: on SQLite it waits for the write lock, so a database
    # that cannot take the commit refuses the instance (0xA700) before its bytes are written.
    with _database(ctx) as session:
        row = find_instance(session, sop_instance_uid)
        # A row whose file retention purged is not held: the instance is stored again.
        if row is None or row.purged_at is not None:
            return None
        return (row.sha256, row.study_instance_uid)


def _held_path(ctx: IngestContext, sop_instance_uid: str) -> str | None:
    """The file the committed row of ``sop_instance_uid`` names, if any
    (``dicom_node.ops.reconcile``)."""
    with _database(ctx, read_only=True) as session:
        row = find_instance(session, sop_instance_uid)
        return row.path if row is not None else None


def _commit(
    ctx: IngestContext, header: InstanceHeader, stored: StoredFile, calling: str
) -> int | None:
    # On failure the file stays as an unacknowledged leftover (no row names it); the sender's
    # retry stores its copy beside it.
    with _database(ctx) as session:
        return record_instance(session, header, stored, calling_ae_title=calling, now=utcnow())


def _duplicate(
    ctx: IngestContext,
    header: InstanceHeader,
    existing: tuple[str, str],
    digest: str,
    calling: str,
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
    record_safely(
        ctx.session_factory,
        "instance.conflict",
        level="warning",
        study_instance_uid=header.study_instance_uid,
        sop_instance_uid=header.sop_instance_uid,
        calling_ae_title=calling,
        kept_sha256=existing[0],
        refused_sha256=digest,
    )
    return SUCCESS


def _discard(ctx: IngestContext, header: InstanceHeader, calling: str) -> int:
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


def record_safely(
    session_factory: sessionmaker[Session], name: str, level: str, **detail: Any
) -> None:
    """Record an event where failing to record must not change the DICOM outcome."""
    study = detail.pop("study_instance_uid", None)
    sop = detail.pop("sop_instance_uid", None)
    try:
        with session_scope(session_factory) as session:
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
