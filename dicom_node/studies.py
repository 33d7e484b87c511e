"""Assemble received instances into studies and series, and close studies that went quiet.

A study is complete when no instance has arrived for ``study_quiet_seconds``; closing it
queues exactly one analysis job per configured model for its current revision.  An instance
that arrives after the study was closed bumps the revision, so the next close queues new jobs
that supersede the old ones.  All updates are single atomic statements, and an instance is
added under its study row's lock, so this is safe across associations and across nodes
sharing PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import CursorResult, case, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config.models import ModelSpec
from dicom_node.db.models import Event, Instance, Series, Study
from dicom_node.db.session import session_scope
from dicom_node.db.upsert import insert_ignore
from dicom_node.events import event_detail, record_event
from dicom_node.header import InstanceHeader
from dicom_node.jobs.enqueue import enqueue_analysis, supersede_older_analyses
from dicom_node.store import StoredFile
from dicom_node.validation.modes import ModelTarget, model_targets

log = structlog.get_logger(__name__)

_STUDY_FIELDS = (
    "patient_name",
    "patient_id",
    "patient_birth_date",
    "patient_sex",
    "patient_age",
    "accession_number",
    "study_date",
    "study_time",
    "study_description",
)


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    """The acknowledged instance with this SOP Instance UID, if any."""
    return session.get(Instance, sop_instance_uid)


def record_instance(
    session: Session,
    header: InstanceHeader,
    stored: StoredFile,
    *,
    calling_ae_title: str,
    now: datetime,
) -> int | None:
    """Add the instance's rows (study, series, instance, event); returns its study revision.

    Returns None, adding nothing, when the instance was committed meanwhile by another
    association, typically on another node sharing the database (the caller answers as for
    a duplicate).  Six statements for a new instance (seven on PostgreSQL), each a Core
    statement: this runs once per received instance, inside its C-STORE.
    """
    _add_study(session, header, now)
    existing = find_instance(session, header.sop_instance_uid)
    if existing is not None and existing.purged_at is None:
        return None
    # One statement, so two associations adding to one study cannot both bump the revision.
    revision = session.execute(
        update(Study)
        .where(Study.study_instance_uid == header.study_instance_uid)
        .values(
            revision=case(
                (Study.closed_revision >= Study.revision, Study.revision + 1), else_=Study.revision
            ),
            last_received_at=now,
            instance_count=Study.instance_count + (0 if existing is not None else 1),
        )
        .returning(Study.revision)
    ).scalar_one()
    if existing is not None:  # sent again after retention purged it: held again, re-analysed
        _restore_purged(session, existing, stored, revision, calling_ae_title, now)
        return revision
    _add_series(session, header)
    session.execute(
        insert(Instance).values(_instance_row(header, stored, revision, now, calling_ae_title))
    )
    session.execute(
        insert(Event).values(
            created_at=now,
            name="instance.stored",
            level="info",
            study_instance_uid=header.study_instance_uid,
            sop_instance_uid=header.sop_instance_uid,
            detail=event_detail(
                study_revision=revision,
                calling_ae_title=calling_ae_title,
                size_bytes=stored.size_bytes,
            ),
        )
    )
    return revision


def _add_study(session: Session, header: InstanceHeader, now: datetime) -> None:
    """The study's row, made if new, and locked for this transaction.

    Every writer of this study's instances takes the study row's lock first, so once we hold
    it an instance another node committed is visible (READ COMMITTED) and not added twice.
    SQLite has no FOR UPDATE: BEGIN IMMEDIATE already serialises its writers.
    """
    fields = asdict(header)
    insert_ignore(
        session,
        Study,
        {
            "study_instance_uid": header.study_instance_uid,
            "revision": 1,
            "closed_revision": 0,
            "first_received_at": now,
            "last_received_at": now,
            "instance_count": 0,
            **{name: fields[name] for name in _STUDY_FIELDS},
        },
    )
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            select(Study.study_instance_uid)
            .where(Study.study_instance_uid == header.study_instance_uid)
            .with_for_update()
        )


def _add_series(session: Session, header: InstanceHeader) -> None:
    insert_ignore(
        session,
        Series,
        {
            "series_instance_uid": header.series_instance_uid,
            "study_instance_uid": header.study_instance_uid,
            "modality": header.modality,
            "series_number": header.series_number,
            "series_description": header.series_description,
        },
    )


def _instance_row(
    header: InstanceHeader, stored: StoredFile, revision: int, now: datetime, calling: str
) -> dict[str, Any]:
    return {
        "sop_instance_uid": header.sop_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "series_instance_uid": header.series_instance_uid,
        "study_instance_uid": header.study_instance_uid,
        "study_revision": revision,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "path": stored.relative_path,
        "size_bytes": stored.size_bytes,
        "sha256": stored.sha256,
        "received_at": now,
        "calling_ae_title": calling,
        "modality": header.modality,
        "view_position": header.view_position,
        "body_part_examined": header.body_part_examined,
        "image_type": header.image_type,
        "rows": header.rows,
        "columns": header.columns,
        "field_of_view_mm": header.field_of_view_mm,
    }


def _restore_purged(
    session: Session,
    instance: Instance,
    stored: StoredFile,
    revision: int,
    calling_ae_title: str,
    now: datetime,
) -> None:
    """The file of a purged instance is back: its row points at it and joins ``revision``."""
    instance.path, instance.size_bytes, instance.sha256 = (
        stored.relative_path,
        stored.size_bytes,
        stored.sha256,
    )
    instance.purged_at, instance.received_at, instance.study_revision = None, now, revision
    instance.calling_ae_title = calling_ae_title
    record_event(
        session,
        "instance.stored",
        now=now,
        study_instance_uid=instance.study_instance_uid,
        sop_instance_uid=instance.sop_instance_uid,
        study_revision=revision,
        calling_ae_title=calling_ae_title,
        size_bytes=stored.size_bytes,
        after_purge=True,
    )


def close_quiet_studies(
    factory: sessionmaker[Session],
    *,
    quiet_seconds: float,
    max_attempts: int,
    now: datetime,
    models: Sequence[ModelSpec] = (),
) -> list[int]:
    """Queue the analysis of each study quiet for ``quiet_seconds``: one job per configured
    model (``models``; none given: one job for the worker's first model), each in the
    model's current mode.  Returns the job ids."""
    cutoff = now - timedelta(seconds=quiet_seconds)
    with session_scope(factory) as session:
        candidates = session.execute(
            select(Study.study_instance_uid, Study.revision).where(
                Study.closed_revision < Study.revision, Study.last_received_at <= cutoff
            )
        ).all()
    job_ids = []
    for study_instance_uid, revision in candidates:
        with session_scope(factory) as session:
            targets = model_targets(session, models) if models else [ModelTarget("", "live")]
            job_ids += _close_study(
                session, study_instance_uid, revision, cutoff, max_attempts, now, targets
            )
    return job_ids


def _close_study(
    session: Session,
    study_instance_uid: str,
    revision: int,
    cutoff: datetime,
    max_attempts: int,
    now: datetime,
    targets: Sequence[ModelTarget],
) -> list[int]:
    # Guarded update: a new instance (revision bump or fresh arrival) since the select wins.
    closed = cast(
        CursorResult[Any],
        session.execute(
            update(Study)
            .where(
                Study.study_instance_uid == study_instance_uid,
                Study.revision == revision,
                Study.closed_revision < revision,
                Study.last_received_at <= cutoff,
            )
            .values(closed_revision=revision)
        ),
    ).rowcount
    if not closed:
        return []
    job_ids = []
    for target in targets:
        job = enqueue_analysis(
            session,
            study_instance_uid=study_instance_uid,
            study_revision=revision,
            max_attempts=max_attempts,
            now=now,
            model=target.name,
            mode=target.mode,
        )
        superseded = supersede_older_analyses(
            session,
            study_instance_uid=study_instance_uid,
            study_revision=revision,
            by_job_id=job.id,
            now=now,
            model=target.name,
        )
        record_event(
            session,
            "study.closed",
            now=now,
            study_instance_uid=study_instance_uid,
            job_id=job.id,
            study_revision=revision,
            superseded_job_ids=superseded,
            model=target.name,
            mode=target.mode,
        )
        log.info(
            "study.closed",
            study_instance_uid=study_instance_uid,
            study_revision=revision,
            job_id=job.id,
            superseded_job_ids=superseded,
            model=target.name,
            mode=target.mode,
        )
        job_ids.append(job.id)
    return job_ids
