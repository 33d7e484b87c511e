"""The node's periodic ticks, run by one APScheduler BackgroundScheduler per process.

The scheduler keeps no job store of its own (the database is the only shared state), so any
number of node processes can run it.  Tick bodies are plain functions taking ``now``, so tests
call them directly.  Ticks added by later stages (dispatch, lease rescue, retention) join the
list in :func:`build_scheduler`.
"""

from __future__ import annotations

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.clock import utcnow
from dicom_node.config import Settings
from dicom_node.studies import close_quiet_studies

log = structlog.get_logger(__name__)


def tick_close_quiet_studies(settings: Settings, factory: sessionmaker[Session]) -> None:
    """Close studies quiet for ``study_quiet_seconds``; a database outage waits for the next tick."""
    try:
        close_quiet_studies(factory, quiet_seconds=settings.scheduler.study_quiet_seconds,
                            max_attempts=settings.scheduler.max_attempts, now=utcnow())
    except SQLAlchemyError as exc:
        log.error("tick.failed", tick="close_quiet_studies", error_type=type(exc).__name__)


def build_scheduler(settings: Settings, factory: sessionmaker[Session]) -> BackgroundScheduler:
    """A scheduler with the node's ticks, not yet started."""
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(tick_close_quiet_studies, "interval",
                      seconds=settings.scheduler.tick_seconds, args=[settings, factory],
                      id="close_quiet_studies", max_instances=1, coalesce=True)
    return scheduler
