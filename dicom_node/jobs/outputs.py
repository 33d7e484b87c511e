"""Gather what a finished analysis job's outputs are built from, and build them.

Reads the rows and source headers an output needs (the analysed image's header, the outputs
an earlier revision left current), outside any write transaction, and hands plain values to
``dicom_node.outputs``.  Values a source image holds in breach of their VR are not copied; the
keywords dropped are recorded as an event, never their values.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pydicom
import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config.settings import Settings
from dicom_node.db.models import Instance
from dicom_node.db.session import session_scope
from dicom_node.errors import InvalidInstanceError
from dicom_node.events import record_event
from dicom_node.jobs.queue import Lease
from dicom_node.jobs.records import read_headers, superseded_outputs
from dicom_node.outputs.build import (
    BuiltOutput,
    build_analysis_outputs,
    build_not_analysed_outputs,
    build_withdrawal,
)
from dicom_node.outputs.source import SourceHeader, source_header
from dicom_node.results import AlgorithmInfo, Analysis

log = structlog.get_logger(__name__)


def build_result_outputs(
    analysis: Analysis,
    lease: Lease,
    source_path: Path,
    settings: Settings,
    factory: sessionmaker[Session],
    now: datetime,
) -> list[BuiltOutput]:
    """SR and SCs of an analysed job, plus a rejection note when it replaces earlier results."""
    header = _header(source_path, lease, factory, now)
    outputs = build_analysis_outputs(header.dataset, analysis, settings, now)
    withdrawal = _withdrawal(
        lease, (analysis.sop_instance_uid,), analysis.algorithm.weights_sha256, settings, factory
    )
    return outputs + withdrawal


def build_not_analysed(
    lease: Lease,
    reason: str,
    algorithm: AlgorithmInfo,
    settings: Settings,
    factory: sessionmaker[Session],
    now: datetime,
) -> list[BuiltOutput]:
    """The SR saying why the study revision was not analysed (and a rejection note if due)."""
    root = Path(settings.storage.root)
    with session_scope(factory) as session:
        paths = list(
            session.scalars(
                select(Instance.path)
                .where(
                    Instance.study_instance_uid == lease.study_instance_uid,
                    Instance.study_revision <= lease.study_revision,
                    Instance.purged_at.is_(None),
                )
                .order_by(Instance.sop_instance_uid)
            )
        )  # still stored
    if not paths:
        return []
    headers = [_header(root / path, lease, factory, now).dataset for path in paths]
    outputs = build_not_analysed_outputs(
        headers, reason, algorithm, lease.study_revision, settings, now
    )
    inputs = tuple(str(h.SOPInstanceUID) for h in headers)
    return outputs + _withdrawal(lease, inputs, algorithm.weights_sha256, settings, factory)


def _header(
    path: Path, lease: Lease, factory: sessionmaker[Session], now: datetime
) -> SourceHeader:
    try:
        header = source_header(pydicom.dcmread(path, stop_before_pixels=True, force=True))
    except Exception as exc:  # pydicom raises many types on a broken file
        raise InvalidInstanceError(f"stored file cannot be read ({type(exc).__name__})") from None
    if header.dropped:
        with session_scope(factory) as session:
            record_event(
                session,
                "outputs.source_values_dropped",
                now=now,
                level="warning",
                study_instance_uid=lease.study_instance_uid,
                job_id=lease.job_id,
                sop_instance_uid=str(header.dataset.SOPInstanceUID),
                keywords=list(header.dropped),
            )
    return header


def _withdrawal(
    lease: Lease,
    inputs: tuple[str, ...],
    weights_sha256: str,
    settings: Settings,
    factory: sessionmaker[Session],
) -> list[BuiltOutput]:
    """The IOCM rejection note for earlier revisions' results, when a peer takes them."""
    if not any(p.send_results and p.withdraw_superseded for p in settings.peers):
        return []
    with session_scope(factory) as session:
        previous = superseded_outputs(session, lease.study_instance_uid, lease.study_revision)
    if not previous:
        return []
    try:
        headers = read_headers(Path(settings.storage.root), previous)
    except Exception as exc:  # an earlier output file is gone: never block the new results
        log.warning(
            "outputs.withdrawal_not_built",
            job_id=lease.job_id,
            study_instance_uid=lease.study_instance_uid,
            error_type=type(exc).__name__,
        )
        return []
    return [build_withdrawal(headers, inputs, lease.study_revision, weights_sha256, settings)]
