"""Audit rows the database could not take, kept on disk until it answers again.

When :func:`dicom_node.audit.trail.record_audit_safely` finds the database unreachable, the row's
values become one JSON line in ``<storage root>/audit-spool/HOST~PID~audit.jsonl``: the
process's own file, appended under an ``flock`` and fsynced (file and folder) before the
caller goes on.  A line holds exactly what the row would: the study UID and the patient's
ID where the event names them, never a name; so the folder is 0700 and the files 0600.

:func:`drain` (at start-up and on the scheduler's ``audit_spool`` tick) first claims the
files: this process's own, those of this host's processes that have ended and those of other
hosts untouched for a day (:func:`dicom_node.store.abandoned`, as for temp files), each renamed
under its lock to ``HOST~PID~NANOS.draining`` of the drainer.  It then inserts the lines in
order, with their original times, skipping every ``event_uuid`` the table already holds (a
crash mid-drain, or a commit whose answer was lost, cannot make a second row), and removes
a file once all its lines are in.

The spool is found through the session factory (:func:`attach_spool`), as the syslog copy
is attached to it: the callers of the audit functions need not know about it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    InternalError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import AuditEvent
from dicom_node.db.session import session_scope
from dicom_node.store import abandoned, fsync_dir, writer_name

log = structlog.get_logger(__name__)

SPOOL_DIR = "audit-spool"
DRAIN_INTERVAL_SECONDS = 10.0  # the scheduler's audit_spool tick
_INFO_KEY = "dicom_node.audit.spool"
_BATCH = 200  # spooled rows per insert transaction
_OWN_SUFFIX = "audit.jsonl"
_CLAIMED = ".draining"


@dataclass(frozen=True)
class AuditSpool:
    """The spool folder of one storage root."""

    directory: Path

    @classmethod
    def under(cls, storage_root: Path) -> AuditSpool:
        return cls(storage_root / SPOOL_DIR)

    @property
    def own_file(self) -> Path:
        """This process's spool file."""
        return self.directory / writer_name(_OWN_SUFFIX)


def attach_spool(factory: sessionmaker[Session], spool: AuditSpool) -> None:
    """Let :func:`dicom_node.audit.trail.record_audit_safely` spool rows of ``factory``'s
    sessions."""
    info = dict(factory.kw.get("info") or {})
    info[_INFO_KEY] = spool
    factory.configure(info=info)


def spool_of(factory: sessionmaker[Session]) -> AuditSpool | None:
    """The spool attached to ``factory``, if any."""
    spool = (factory.kw.get("info") or {}).get(_INFO_KEY)
    return spool if isinstance(spool, AuditSpool) else None


def is_outage(exc: SQLAlchemyError) -> bool:
    """Whether ``exc`` says the database is unreachable or cannot write now (worth spooling),
    rather than that it refused this row (a constraint, a bad value: spooling would not help).
    SQLite's "database is locked" and "readonly database" are OperationalError; PostgreSQL's
    read-only standby after a fail-over is InternalError (SQLSTATE 25006)."""
    if isinstance(exc, (OperationalError, InterfaceError, InternalError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _make_folder(spool: AuditSpool) -> None:
    spool.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if spool.directory.stat().st_mode & 0o077:
        spool.directory.chmod(0o700)


def append_event(spool: AuditSpool, values: dict[str, Any]) -> None:
    """Append one row's values to this process's spool file; durable when this returns.

    Raises the OSError of a failed write (the caller logs the row as not recorded).
    """
    _make_folder(spool)
    line = (
        json.dumps(
            {**values, "created_at": values["created_at"].isoformat()}, sort_keys=True
        ).encode()
        + b"\n"
    )
    path = spool.own_file
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            if not _still_named(descriptor, path):
                continue  # a drain claimed (renamed) the file meanwhile: append to a new one
            size = os.fstat(descriptor).st_size
            # A line torn by a crash must not swallow this one: start on a line of its own.
            torn = size > 0 and os.pread(descriptor, 1, size - 1) != b"\n"
            _write_all(descriptor, (b"\n" if torn else b"") + line)
            os.fsync(descriptor)
            break
        finally:
            os.close(descriptor)  # releases the lock
    fsync_dir(spool.directory)


def _still_named(descriptor: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


def pending_events(spool: AuditSpool) -> int:
    """Lines waiting in the spool (all hosts' files), for the doctor and the tests."""
    if not spool.directory.is_dir():
        return 0
    return sum(
        sum(1 for line in path.read_bytes().splitlines() if line.strip())
        for path in spool.directory.iterdir()
        if path.is_file()
    )


def drain(spool: AuditSpool, factory: sessionmaker[Session]) -> int:
    """Write the spooled rows this process may take; returns how many rows were inserted.

    Raises SQLAlchemyError when the database fails (what is not yet in stays spooled) and
    OSError when the spool cannot be read.
    """
    if not spool.directory.is_dir():
        return 0
    for path in _claimable(spool):
        _claim(spool, path)
    inserted = 0
    for path in sorted(spool.directory.glob(writer_name(f"*{_CLAIMED}"))):
        inserted += _drain_file(path, factory)
        path.unlink()
        fsync_dir(spool.directory)
    if inserted:
        log.info("audit.spool_drained", rows=inserted)
    return inserted


def _claimable(spool: AuditSpool) -> list[Path]:
    """Leftover claims of ended drainers first (they are older), then the spool files."""
    own_claims = writer_name("")
    found = [
        path
        for path in spool.directory.iterdir()
        if path.is_file()
        and abandoned(path)
        and not (path.name.startswith(own_claims) and path.name.endswith(_CLAIMED))
    ]
    return sorted(found, key=lambda p: (not p.name.endswith(_CLAIMED), p.name))


def _claim(spool: AuditSpool, path: Path) -> None:
    """Rename ``path`` to a claim of this process, under its lock (appends wait, then reopen)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # another process of this host claimed it first
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        if _still_named(descriptor, path):
            os.rename(path, spool.directory / writer_name(f"{time.time_ns():020d}{_CLAIMED}"))
            fsync_dir(spool.directory)
    finally:
        os.close(descriptor)


def _drain_file(path: Path, factory: sessionmaker[Session]) -> int:
    inserted, batch = 0, []
    for values in _read_lines(path):
        batch.append(values)
        if len(batch) >= _BATCH:
            inserted += _insert(factory, batch)
            batch = []
    if batch:
        inserted += _insert(factory, batch)
    return inserted


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
            values["created_at"] = datetime.fromisoformat(values["created_at"])
        except (ValueError, KeyError, TypeError):
            # Only a line a crash tore before its fsync (its caller never returned).
            log.warning("audit.spool_line_unreadable", file=path.name, line=number)
            continue
        yield values


def _insert(factory: sessionmaker[Session], batch: list[dict[str, Any]]) -> int:
    """Insert the rows of ``batch`` the table does not hold yet, in order, in one transaction."""
    uuids = [values["event_uuid"] for values in batch]
    with session_scope(factory) as session:
        held = set(
            session.scalars(select(AuditEvent.event_uuid).where(AuditEvent.event_uuid.in_(uuids)))
        )
        fresh = [values for values in batch if values["event_uuid"] not in held]
        for values in fresh:
            session.add(AuditEvent(**values))  # one flush inserts in this order
    return len(fresh)


def tick_drain(spool: AuditSpool, factory: sessionmaker[Session]) -> None:
    """The scheduler's tick: drain, and leave what the database still refuses for the next."""
    try:
        drain(spool, factory)
    except SQLAlchemyError as exc:
        log.warning(
            "audit.spool_waiting", error_type=type(exc).__name__, pending=pending_events(spool)
        )
    except OSError as exc:
        log.error("audit.spool_unreadable", error=exc.strerror or type(exc).__name__)
