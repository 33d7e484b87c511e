"""Start-up reconciliation of the store with the database: files under ``instances/`` that no
row names.

The C-STORE handler renames the fsynced file into place and then commits its row; a kill -9
(or a database failure) between the two leaves a complete file that no row names, and the
sender, which got no success, sends it again.  Before the SCP listens, :func:`reconcile_store`
walks ``instances/`` and, for each such file:

* adopts it when it is a whole PS3.10 file of an instance the node does not hold (no row, or
  a row whose file retention purged) and its name is the one the store gives its UIDs: the
  row is made by :func:`dicom_node.studies.record_instance`, exactly as for a C-STORE, so the
  study is (re)analysed, and a re-send is then answered as a duplicate;
* else moves it to ``quarantine/`` beside a ``.reason.json`` (what it was, why): a file that
  is truncated or not DICOM, one whose UIDs differ from its path, or a second copy of an
  instance the node holds.  Nothing is deleted.

The summary is logged (counts only: no PHI) and, when anything was found, written as one
``store.reconciled`` event, which ``dicom-node doctor`` reports with the quarantine.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.clock import utcnow
from dicom_node.db.models import Event, Instance
from dicom_node.db.session import session_scope
from dicom_node.errors import InvalidInstanceError
from dicom_node.events import record_event
from dicom_node.header import InstanceHeader, read_header
from dicom_node.ops.part10 import split_part10
from dicom_node.store import (
    INSTANCES_DIR,
    QUARANTINE_DIR,
    StoredFile,
    fsync_dir,
    instance_relative_path,
    sha256_of,
)
from dicom_node.studies import find_instance, record_instance

log = structlog.get_logger(__name__)

ADOPTED_CALLING_AE_TITLE = "RECONCILED"  # the sender of an adopted file is not on record
RECONCILED_EVENT = "store.reconciled"
REASON_SUFFIX = ".reason.json"
_PATHS_PER_QUERY = 500
_SECOND_COPY = re.compile(r"\.[0-9a-f]{12}\.dcm")  # store._link_new's unique suffix


@dataclass(frozen=True)
class ReconcileSummary:
    """What one reconciliation found (all counts)."""

    files_checked: int = 0
    adopted: int = 0
    quarantined: int = 0
    named_meanwhile: int = 0  # its writer (another node) committed the row while we looked
    unresolved: int = 0  # could not be moved (logged): looked at again at the next start
    temp_files_removed: int = 0

    @property
    def orphans(self) -> int:
        return self.adopted + self.quarantined + self.named_meanwhile + self.unresolved


def reconcile_store(
    root: Path,
    factory: sessionmaker[Session],
    *,
    max_inflated_bytes: int,
    temp_files_removed: int = 0,
) -> ReconcileSummary:
    """Adopt or quarantine every file under ``root/instances`` that no row names.

    ``max_inflated_bytes`` caps a Deflated data set as at the SCP (``[scp] max_inflated_mb``).

    Raises SQLAlchemyError when the database fails (the start fails: it was just checked).
    """
    counts = dict.fromkeys(
        ("files_checked", "adopted", "quarantined", "named_meanwhile", "unresolved"), 0
    )
    for relative_paths in _file_batches(root):
        counts["files_checked"] += len(relative_paths)
        with session_scope(factory) as session:
            named = set(
                session.scalars(select(Instance.path).where(Instance.path.in_(relative_paths)))
            )
        for relative_path in relative_paths:
            if relative_path in named:
                continue
            try:
                counts[_reconcile_file(root, factory, relative_path, max_inflated_bytes)] += 1
            except OSError as exc:  # e.g. a folder it may not write: go on
                log.error("store.orphan_unresolved", error_type=type(exc).__name__)
                counts["unresolved"] += 1
    summary = ReconcileSummary(temp_files_removed=temp_files_removed, **counts)
    log.info(RECONCILED_EVENT, **asdict(summary))
    if summary.orphans or temp_files_removed:
        with session_scope(factory) as session:
            record_event(
                session,
                RECONCILED_EVENT,
                now=utcnow(),
                level="warning" if summary.quarantined else "info",
                **asdict(summary),
            )
    return summary


def _file_batches(root: Path) -> Iterator[list[str]]:
    """Relative paths of the files under ``instances/``, a few hundred at a time, sorted per
    folder (``<sop>.dcm`` before its ``<sop>.<unique>.dcm`` second copies)."""
    batch: list[str] = []
    for folder, _, names in os.walk(root / INSTANCES_DIR):
        base = Path(folder).relative_to(root).as_posix()
        for name in sorted(names, key=lambda n: (len(n), n)):
            if (Path(folder) / name).is_file():
                batch.append(f"{base}/{name}")
            if len(batch) >= _PATHS_PER_QUERY:
                yield batch
                batch = []
    if batch:
        yield batch


def _reconcile_file(
    root: Path, factory: sessionmaker[Session], relative_path: str, max_inflated_bytes: int
) -> str:
    """Adopt or quarantine one file no row named; returns the summary count it adds to."""
    try:
        header, stored = examine(root, relative_path, max_inflated_bytes=max_inflated_bytes)
    except InvalidInstanceError as exc:
        quarantine(root, relative_path, str(exc))
        return "quarantined"
    with session_scope(factory) as session:
        revision = record_instance(
            session, header, stored, calling_ae_title=ADOPTED_CALLING_AE_TITLE, now=utcnow()
        )
        if revision is None:
            held = find_instance(session, header.sop_instance_uid)
            held_path = held.path if held is not None else None
        else:
            record_event(
                session,
                "instance.adopted",
                now=utcnow(),
                study_instance_uid=header.study_instance_uid,
                sop_instance_uid=header.sop_instance_uid,
                study_revision=revision,
                path=relative_path,
            )
    if revision is not None:
        log.warning(
            "store.orphan_adopted",
            study_instance_uid=header.study_instance_uid,
            sop_instance_uid=header.sop_instance_uid,
            study_revision=revision,
        )
        return "adopted"
    if held_path == relative_path:
        return "named_meanwhile"
    quarantine(root, relative_path, f"a second copy of an instance the node holds in {held_path}")
    return "quarantined"


def examine(
    root: Path, relative_path: str, *, max_inflated_bytes: int
) -> tuple[InstanceHeader, StoredFile]:
    """The header and the stored-file record of a file that may be adopted.

    Raises
    ------
    InvalidInstanceError
        When the file is not a complete PS3.10 file with pixel data, its meta information
        names another instance, or its path is not the one the store gives its UIDs.
    """
    try:
        data = (root / relative_path).read_bytes()
    except OSError as exc:
        raise InvalidInstanceError(f"file cannot be read ({exc.strerror})") from None
    part10 = split_part10(data, max_inflated_bytes=max_inflated_bytes)
    if not part10.has_pixel_data:
        raise InvalidInstanceError("data set has no pixel data (cut between two elements?)")
    header = read_header(
        part10.dataset, part10.transfer_syntax_uid, max_inflated_bytes=max_inflated_bytes
    )
    if part10.media_storage_sop_instance_uid != header.sop_instance_uid:
        raise InvalidInstanceError("File Meta Information names another SOP Instance UID")
    expected = instance_relative_path(
        header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    second_copy = expected.removesuffix(".dcm")
    if relative_path != expected and not (
        relative_path.startswith(second_copy)
        and _SECOND_COPY.fullmatch(relative_path[len(second_copy) :])
    ):
        raise InvalidInstanceError("path does not match the file's UIDs")
    # The digest is of the data set alone, as the C-STORE handler computes it: a re-send of
    # the same bytes is then a duplicate, not a conflict.
    return header, StoredFile(relative_path, sha256_of(part10.dataset), len(data))


def quarantine(root: Path, relative_path: str, reason: str) -> Path:
    """Move ``relative_path`` into ``quarantine/`` with a ``.reason.json`` beside it.

    The new name is a time and a random part only (the old one is in the reason file), so
    the log line names no file a person called after a patient.
    """
    folder = root / QUARANTINE_DIR
    folder.mkdir(mode=0o750, exist_ok=True)
    now = utcnow()
    name = f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}.dcm"
    record = {"original_path": relative_path, "reason": reason, "quarantined_at": now.isoformat()}
    descriptor = os.open(
        folder / f"{name}{REASON_SUFFIX}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640
    )
    try:
        os.write(descriptor, json.dumps(record, indent=2).encode() + b"\n")
        os.fsync(descriptor)  # the reason is on disk before the file moves
    finally:
        os.close(descriptor)
    source = root / relative_path
    os.rename(source, folder / name)
    fsync_dir(folder)
    fsync_dir(source.parent)
    log.warning("store.orphan_quarantined", quarantined_as=name, reason=reason)
    return folder / name


def quarantined_files(root: Path) -> list[tuple[str, str]]:
    """(file name, reason) of each file in ``quarantine/``, oldest first."""
    folder = root / QUARANTINE_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.endswith(REASON_SUFFIX):
            continue
        try:
            reason = json.loads(path.with_name(path.name + REASON_SUFFIX).read_text())["reason"]
        except (OSError, ValueError, KeyError, TypeError):
            reason = "no reason file"
        found.append((path.name, str(reason)))
    return found


def last_reconciliation(session: Session) -> tuple[datetime, dict[str, int]] | None:
    """The time and counts of the latest ``store.reconciled`` event, if there is one."""
    row = session.scalars(
        select(Event).where(Event.name == RECONCILED_EVENT).order_by(Event.id.desc()).limit(1)
    ).first()
    if row is None:
        return None
    return row.created_at, json.loads(row.detail) if row.detail else {}
