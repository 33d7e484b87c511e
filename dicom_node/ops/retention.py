"""Retention: purge received images once their study's results are delivered and old enough.

Only the received files under ``instances/`` are purged.  Everything the node produced or
recorded stays: the instance rows (with ``purged_at`` set), analysis results and findings,
CAMs, the SR/SC/KOS outputs, the delivery ledger, events and the audit trail.

A study's images are eligible when all of these hold:

- the study is closed at its current revision (no instance arrived since it was closed);
- that revision's analysis job is ``done`` or ``skipped`` (not analysed, with its reason).
  A ``dead`` job is never purged: its images stay so that ``dicom-node jobs retry`` can run it
  again.  Queued, running and failed (waiting to retry) jobs are not final either;
- every delivery job queued for that revision (one per peer receiving results) is ``done``,
  i.e. every output was accepted by every peer it was queued for.  A revision with nothing to
  deliver counts as delivered;
- the latest of those final states is at least ``[retention] images_days`` days old.

Each study is purged in its own transaction: the study row is locked (``FOR UPDATE`` on
PostgreSQL; on SQLite ``BEGIN IMMEDIATE`` already holds the write lock), so an instance that
re-opens the study waits; eligibility is checked again; the files are removed and their
folders fsynced; then ``purged_at`` and one ``instances.purged`` event are committed.  A crash
between removal and commit leaves rows whose file is gone: the next run finds the study still
eligible and records those files as already missing, which is not an error.  A file that
cannot be removed (permissions, I/O error) keeps its row unpurged and is tried next run.
Folders are left in place: removing one could race with a C-STORE writing into it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import structlog
from sqlalchemy import Select, and_, exists, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, aliased, sessionmaker

from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.models import Instance, Job, JobKind, JobState, Study
from dicom_node.db.session import session_scope
from dicom_node.events import record_event
from dicom_node.store import INSTANCES_DIR, fsync_dir

log = structlog.get_logger(__name__)

FINAL_ANALYSIS_STATES = (JobState.DONE.value, JobState.SKIPPED.value)
PURGED_EVENT = "instances.purged"
REMOVED, MISSING, FAILED = "removed", "missing", "failed"


@dataclass(frozen=True)
class StudyPurge:
    """What happened (or, in a dry run, would happen) to one study's received files."""

    study_instance_uid: str
    study_revision: int
    removed: int  # files removed (dry run: present and would be removed)
    missing: int  # rows whose file was already gone: recorded as purged
    failed: int  # files that could not be removed: rows left unpurged, tried next run
    bytes_freed: int


@dataclass(frozen=True)
class RetentionReport:
    """One retention run: the cutoff it used and each study it purged."""

    cutoff: datetime
    dry_run: bool
    studies: tuple[StudyPurge, ...]

    @property
    def removed(self) -> int:
        return sum(s.removed for s in self.studies)

    @property
    def missing(self) -> int:
        return sum(s.missing for s in self.studies)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.studies)

    @property
    def bytes_freed(self) -> int:
        return sum(s.bytes_freed for s in self.studies)


def retention_cutoff(images_days: int, now: datetime) -> datetime:
    """Final states at or before this moment are old enough to purge."""
    return now - timedelta(days=images_days)


def eligible_query(cutoff: datetime) -> Select[str, int]:
    """(study UID, revision) of every study whose unpurged images may be purged now."""
    analysis, delivery = aliased(Job), aliased(Job)
    unpurged = exists().where(
        Instance.study_instance_uid == Study.study_instance_uid, Instance.purged_at.is_(None)
    )
    waiting_delivery = exists().where(
        delivery.kind == JobKind.DELIVERY.value,
        delivery.study_instance_uid == Study.study_instance_uid,
        delivery.study_revision == Study.revision,
        or_(delivery.state != JobState.DONE.value, delivery.updated_at > cutoff),
    )
    revision_analysis = and_(
        analysis.kind == JobKind.ANALYSIS.value,
        analysis.study_instance_uid == Study.study_instance_uid,
        analysis.study_revision == Study.revision,
    )
    # Every model's analysis of the revision (live and shadow) has ended before the cutoff.
    analysed = exists().where(revision_analysis)
    analysing = exists().where(
        revision_analysis,
        or_(analysis.state.not_in(FINAL_ANALYSIS_STATES), analysis.updated_at > cutoff),
    )
    return (
        select(Study.study_instance_uid, Study.revision)
        .where(
            Study.closed_revision == Study.revision,
            analysed,
            ~analysing,
            unpurged,
            ~waiting_delivery,
        )
        .order_by(Study.study_instance_uid)
    )


def run_retention(
    factory: sessionmaker[Session],
    storage_root: Path,
    *,
    images_days: int,
    now: datetime,
    dry_run: bool = False,
) -> RetentionReport:
    """Purge (or, with ``dry_run``, only count) every eligible study's received files.

    ``images_days`` 0 means images are kept: nothing is purged.
    """
    cutoff = retention_cutoff(images_days, now)
    if images_days <= 0:
        return RetentionReport(cutoff, dry_run, ())
    with session_scope(factory) as session:
        candidates = [(uid, rev) for uid, rev in session.execute(eligible_query(cutoff))]
    purges = []
    for study_instance_uid, revision in candidates:
        with session_scope(factory) as session:
            purge: StudyPurge | None
            if dry_run:
                purge = plan_study(session, storage_root, study_instance_uid, revision)
            else:
                purge = purge_study(
                    session, storage_root, study_instance_uid, revision, cutoff=cutoff, now=now
                )
        if purge is not None:
            purges.append(purge)
    report = RetentionReport(cutoff, dry_run, tuple(purges))
    log.info(
        "retention.finished",
        dry_run=dry_run,
        studies=len(purges),
        instances=report.removed + report.missing,
        missing=report.missing,
        failed=report.failed,
        bytes_freed=report.bytes_freed,
        cutoff=cutoff.isoformat(),
    )
    return report


def _unpurged(session: Session, study_instance_uid: str) -> list[tuple[str, str]]:
    return [
        (sop_instance_uid, path)
        for sop_instance_uid, path in session.execute(
            select(Instance.sop_instance_uid, Instance.path)
            .where(Instance.study_instance_uid == study_instance_uid, Instance.purged_at.is_(None))
            .order_by(Instance.sop_instance_uid)
        )
    ]


def plan_study(
    session: Session, storage_root: Path, study_instance_uid: str, revision: int
) -> StudyPurge:
    """What purging the study would do, touching nothing (the dry run)."""
    present = missing = failed = size = 0
    for _, relative in _unpurged(session, study_instance_uid):
        try:
            size += os.stat(storage_root / relative).st_size
            present += 1
        except FileNotFoundError:
            missing += 1
        except OSError:  # unreadable folder: the real run would fail on it too
            failed += 1
    return StudyPurge(study_instance_uid, revision, present, missing, failed, size)


def purge_study(
    session: Session,
    storage_root: Path,
    study_instance_uid: str,
    revision: int,
    *,
    cutoff: datetime,
    now: datetime,
) -> StudyPurge | None:
    """Remove the study's unpurged files and record it; None when it is no longer eligible.

    Runs inside the caller's transaction, which must commit right after (the files are gone).
    """
    session.scalar(
        select(Study.study_instance_uid)
        .where(Study.study_instance_uid == study_instance_uid)
        .with_for_update()
    )
    still = session.execute(
        eligible_query(cutoff).where(Study.study_instance_uid == study_instance_uid)
    ).first()
    if still is None or still[1] != revision:
        return None  # re-opened, re-queued or purged by another node since the first look
    files = _unpurged(session, study_instance_uid)
    outcomes = {sop: remove_file(storage_root, relative) for sop, relative in files}
    _fsync_parents(
        storage_root / relative for sop, relative in files if outcomes[sop][0] == REMOVED
    )
    gone = [sop for sop, (outcome, _) in outcomes.items() if outcome != FAILED]
    if gone:
        session.execute(
            update(Instance)
            .where(Instance.sop_instance_uid.in_(gone), Instance.purged_at.is_(None))
            .values(purged_at=now)
        )
    purge = StudyPurge(
        study_instance_uid,
        revision,
        sum(o == REMOVED for o, _ in outcomes.values()),
        sum(o == MISSING for o, _ in outcomes.values()),
        sum(o == FAILED for o, _ in outcomes.values()),
        sum(size for _, size in outcomes.values()),
    )
    record_event(
        session,
        PURGED_EVENT,
        now=now,
        level="warning" if purge.failed else "info",
        study_instance_uid=study_instance_uid,
        study_revision=revision,
        removed=purge.removed,
        missing=purge.missing,
        failed=purge.failed,
        bytes_freed=purge.bytes_freed,
    )
    log.info(
        "retention.study_purged",
        study_instance_uid=study_instance_uid,
        study_revision=revision,
        removed=purge.removed,
        missing=purge.missing,
        failed=purge.failed,
        bytes_freed=purge.bytes_freed,
    )
    return purge


def remove_file(storage_root: Path, relative: str) -> tuple[str, int]:
    """Remove one received file: (removed, its size), (missing, 0) or (failed, 0).

    Only paths under ``instances/`` are ever removed (outputs and results live elsewhere).
    """
    target = storage_root / relative
    if not target.resolve().is_relative_to((storage_root / INSTANCES_DIR).resolve()):
        log.error("retention.path_refused", path=relative)
        return FAILED, 0
    try:
        size = os.stat(target).st_size
        os.unlink(target)
    except FileNotFoundError:
        return MISSING, 0
    except OSError as exc:
        log.error("retention.remove_failed", path=relative, error=exc.strerror or str(exc))
        return FAILED, 0
    return REMOVED, size


def _fsync_parents(paths: Iterable[Path]) -> None:
    """Make the removals durable: fsync each folder that lost a file (once)."""
    for folder in sorted({path.parent for path in paths}):
        try:
            fsync_dir(folder)
        except FileNotFoundError:
            continue


def tick_retention(settings: Settings, factory: sessionmaker[Session]) -> None:
    """The worker role's periodic purge; a database or disk outage waits for the next tick."""
    try:
        run_retention(
            factory,
            Path(settings.storage.root),
            images_days=settings.retention.images_days,
            now=utcnow(),
        )
    except (SQLAlchemyError, OSError) as exc:
        log.error("tick.failed", tick="retention", error_type=type(exc).__name__)
