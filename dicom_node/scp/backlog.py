"""Backpressure: refuse new associations, transiently, while the analysis backlog is too long.

When ``[scp] max_backlog`` > 0 and more analysis jobs than that are waiting (``queued``, or
``failed`` and waiting to retry), a new association is answered with A-ASSOCIATE-RJ
rejected-transient by the service provider, reason temporary congestion (PS3.8 7.1.1.9 and
Table 9-21: result 2, source 3, reason 1), so the sending PACS keeps the study and retries
later instead of piling more work onto a node that cannot keep up.  Associations that propose
only Verification are still accepted, so a C-ECHO from monitoring tells a busy node from a
dead one.  The count is cached for ``max_age_seconds`` in the :class:`BacklogGauge` held by the
SCP context, so a burst of associations costs one query, not one each.  If the count cannot be
read the association is accepted: each C-STORE then answers for the database itself (0xA700).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import structlog
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at runtime
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.clock import utcnow
from dicom_node.db.models import Job, JobKind, JobState
from dicom_node.db.session import session_scope
from dicom_node.events import record_event

if TYPE_CHECKING:
    from dicom_node.scp.handlers import ScpContext

log = structlog.get_logger(__name__)

# PS3.8 Table 9-21: A-ASSOCIATE-RJ result, source and reason/diagnostic.
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
REASON_TEMPORARY_CONGESTION = 0x01
WAITING_STATES = (JobState.QUEUED.value, JobState.FAILED.value)


def count_waiting_analyses(session: Session) -> int:
    """Analysis jobs waiting to run: queued, or failed and waiting for their retry."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.kind == JobKind.ANALYSIS.value, Job.state.in_(WAITING_STATES))
        )
        or 0
    )


@dataclass
class BacklogGauge:
    """The analysis backlog as last counted; counted again once older than ``max_age_seconds``.

    One per SCP context (no module state).  The lock makes a burst of associations wait for
    one count instead of each running its own.
    """

    max_age_seconds: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _count: int = 0
    _counted_at: float | None = None

    def current(self, factory: sessionmaker[Session]) -> int:
        """The cached count, refreshed from the database when stale."""
        with self._lock:
            now = self.clock()
            if self._counted_at is None or now - self._counted_at >= self.max_age_seconds:
                with session_scope(factory) as session:
                    self._count = count_waiting_analyses(session)
                self._counted_at = now
            return self._count


def _only_verification(event: Event) -> bool:
    request = cast(A_ASSOCIATE, event.assoc.requestor.primitive)  # EVT_REQUESTED: it is set
    contexts = request.presentation_context_definition_list or []
    return bool(contexts) and all(
        str(context.abstract_syntax) == str(Verification) for context in contexts
    )


def refuse_if_backlogged(event: Event, ctx: ScpContext) -> bool:
    """Reject the requested association when the backlog is over the bound; True if rejected."""
    bound = ctx.settings.scp.max_backlog
    if bound <= 0 or _only_verification(event):
        return False
    try:
        waiting = ctx.backlog.current(ctx.session_factory)
    except SQLAlchemyError as exc:
        log.error("backlog.not_counted", error_type=type(exc).__name__)
        return False
    if waiting <= bound:
        return False
    event.assoc.acse.send_reject(
        REJECTED_TRANSIENT, SOURCE_SERVICE_PROVIDER_PRESENTATION, REASON_TEMPORARY_CONGESTION
    )
    event.assoc.kill()  # as handle_requested does: let the DUL send the A-ASSOCIATE-RJ first
    request = cast(A_ASSOCIATE, event.assoc.requestor.primitive)
    detail: dict[str, Any] = {
        "calling_ae_title": str(request.calling_ae_title).strip(),
        "peer_address": event.assoc.requestor.address,
        "reason": "analysis backlog",
        "waiting_analyses": waiting,
        "max_backlog": bound,
    }
    log.warning("association.refused_backlog", **detail)
    try:
        with session_scope(ctx.session_factory) as session:
            record_event(session, "association.refused", now=utcnow(), level="warning", **detail)
    except SQLAlchemyError as exc:
        log.error("event.not_recorded", name="association.refused", error_type=type(exc).__name__)
    return True
