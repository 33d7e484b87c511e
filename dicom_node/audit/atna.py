"""The node's own IHE ATNA-style audit events (IHE ITI TF-2a 3.20.6, DICOM PS3.15 A.5.3).

Each function writes its row in its own transaction through
:func:`dicom_node.audit.trail.record_audit_safely`: these events are written after the fact (an
association has ended, a delivery attempt has been recorded, the node has started), so a
database failure is logged and reported back as False, never raised into the DICOM or job
path.  Patient IDs appear only where the event is about a patient's instances ("DICOM
Instances Transferred"); patient names never.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import __version__
from dicom_node.audit.trail import (
    APPLICATION_STARTED,
    APPLICATION_STOPPED,
    FAILURE,
    INSTANCES_RECEIVED,
    INSTANCES_SENT,
    SECURITY_ALERT,
    SUCCESS,
    record_audit_safely,
)
from dicom_node.clock import utcnow
from dicom_node.config.settings import PeerSettings, Settings
from dicom_node.db.models import Study
from dicom_node.db.session import session_scope
from dicom_node.errors import DeliveryError
from dicom_node.scu.send import DELIVERED, FAILED, REJECTED, SendResult


def record_application_activity(
    factory: sessionmaker[Session], settings: Settings, *, started: bool, roles: Sequence[str]
) -> bool:
    """Application Activity (PS3.15 A.5.3.1): this process started or stopped its roles."""
    return record_audit_safely(
        factory,
        event_type=APPLICATION_STARTED if started else APPLICATION_STOPPED,
        now=utcnow(),
        username="dicom-node",
        version=__version__,
        roles=list(roles),
        host_name=socket.gethostname(),
        ae_title=settings.node.ae_title,
    )


def record_security_alert(
    factory: sessionmaker[Session], *, reason: str, **details: str | int | None
) -> bool:
    """Security Alert (PS3.15 A.5.3.11): e.g. ``association_rejected``, ``tls_handshake_failed``.

    The outcome is failure: the peer's attempt did not succeed.
    """
    return record_audit_safely(
        factory, event_type=SECURITY_ALERT, now=utcnow(), outcome=FAILURE, reason=reason, **details
    )


def record_instances_received(
    factory: sessionmaker[Session],
    *,
    study_instance_uid: str | None,
    patient_id: str | None,
    instances: int,
    failed: int,
    calling_ae_title: str,
    called_ae_title: str,
    peer_address: str,
    association: str,
) -> bool:
    """DICOM Instances Transferred, in (PS3.15 A.5.3.3): one study from one association."""
    return record_audit_safely(
        factory,
        event_type=INSTANCES_RECEIVED,
        now=utcnow(),
        outcome=FAILURE if failed else SUCCESS,
        study_instance_uid=study_instance_uid,
        patient_id=patient_id,
        instances=instances,
        failed_instances=failed,
        calling_ae_title=calling_ae_title,
        called_ae_title=called_ae_title,
        peer_address=peer_address,
        association=association,
    )


def record_instances_sent(
    factory: sessionmaker[Session],
    *,
    study_instance_uid: str,
    peer: PeerSettings | None,
    peer_name: str,
    job_id: int,
    files: int,
    results: Sequence[SendResult],
    error: DeliveryError | None,
    batch_size: int,
) -> int:
    """DICOM Instances Transferred, out: one row per association (batch) of one delivery
    attempt; returns how many rows were written.

    ``results`` come in file order, ``batch_size`` per association; a batch that could not
    be sent at all (``error``) is one failure row for the files left.
    """
    if files == 0 and error is None:
        return 0
    patient_id = _patient_id(factory, study_instance_uid)
    batches = [list(results[i : i + batch_size]) for i in range(0, len(results), batch_size)]
    unsent = files - len(results)
    if error is not None or unsent > 0:
        batches.append([])
    written = 0
    for batch in batches:
        delivered = sum(r.outcome == DELIVERED for r in batch)
        written += record_audit_safely(
            factory,
            event_type=INSTANCES_SENT,
            now=utcnow(),
            outcome=SUCCESS if batch and delivered == len(batch) else FAILURE,
            study_instance_uid=study_instance_uid,
            patient_id=patient_id,
            job_id=job_id,
            peer=peer_name,
            peer_ae_title=peer.ae_title if peer and peer.dimse else None,
            peer_address=_peer_address(peer),
            instances=len(batch) if batch else min(max(unsent, 0), batch_size),
            delivered=delivered,
            failed=sum(r.outcome == FAILED for r in batch),
            rejected=sum(r.outcome == REJECTED for r in batch),
            error=None if batch or error is None else str(error),
        )
    return written


def _patient_id(factory: sessionmaker[Session], study_instance_uid: str) -> str | None:
    try:
        with session_scope(factory) as session:
            return (
                session.scalar(
                    select(Study.patient_id).where(Study.study_instance_uid == study_instance_uid)
                )
                or None
            )
    except SQLAlchemyError:
        return None  # the row write below reports the database's failure


def _peer_address(peer: PeerSettings | None) -> str | None:
    """Where results went: the DICOMweb root (STOW-RS) or host:port (C-STORE)."""
    if peer is None:
        return None
    return peer.dicomweb_url or f"{peer.host}:{peer.port}"
