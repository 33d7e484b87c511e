"""The node's periodic ticks, run by one APScheduler BackgroundScheduler per process.

The scheduler keeps no job store of its own (the database is the only shared state), so any
number of node processes can run it.  Tick bodies are plain functions taking ``now``, so tests
call them directly.  Ticks: close quiet studies (and wake the
worker to dispatch at once), rescue expired leases, and (when ``[retention] images_days`` > 0)
purge received images every ``interval_minutes`` (``dicom_node.ops.retention``).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.session import session_scope
from dicom_node.jobs.queue import reclaim_expired
from dicom_node.ops.retention import tick_retention
from dicom_node.studies import close_quiet_studies

log = structlog.get_logger(__name__)


def tick_close_quiet_studies(
    settings: Settings, factory: sessionmaker[Session], wake: Callable[[], None] | None = None
) -> None:
    """Close studies quiet for ``study_quiet_seconds``; a database outage waits for the next
    tick."""
    try:
        queued = close_quiet_studies(
            factory,
            quiet_seconds=settings.scheduler.study_quiet_seconds,
            max_attempts=settings.scheduler.max_attempts,
            now=utcnow(),
            models=settings.model_specs,
        )
    except SQLAlchemyError as exc:
        log.error("tick.failed", tick="close_quiet_studies", error_type=type(exc).__name__)
        return
    if queued and wake is not None:
        wake()  # dispatch: the worker need not wait for its next poll


def tick_reclaim_expired_leases(factory: sessionmaker[Session]) -> None:
    """Requeue (or give up on) running jobs whose worker stopped renewing its lease."""
    try:
        with session_scope(factory) as session:
            rescued = reclaim_expired(session, now=utcnow())
    except SQLAlchemyError as exc:
        log.error("tick.failed", tick="reclaim_expired_leases", error_type=type(exc).__name__)
        return
    if rescued:
        log.warning("jobs.rescued", job_ids=rescued)


def tick_drift_monitor(settings: Settings, factory: sessionmaker[Session]) -> None:
    """Recompute every configured model's drift (``dicom_node.validation.monitor``)."""
    from dicom_node.validation.monitor import tick_drift  # scipy: the worker's process only

    names = [spec.name for spec in settings.model_specs]
    tick_drift(factory, names, settings.drift, utcnow())


def build_scheduler(
    settings: Settings, factory: sessionmaker[Session], wake: Callable[[], None] | None = None
) -> BackgroundScheduler:
    """A scheduler with the node's ticks, not yet started."""
    scheduler = BackgroundScheduler(timezone="UTC")
    every = settings.scheduler.tick_seconds
    scheduler.add_job(
        tick_close_quiet_studies,
        "interval",
        seconds=every,
        args=[settings, factory, wake],
        id="close_quiet_studies",
        max_instances=1,
        coalesce=True,
    )
    scheduler.add_job(
        tick_reclaim_expired_leases,
        "interval",
        seconds=every,
        args=[factory],
        id="reclaim_expired_leases",
        max_instances=1,
        coalesce=True,
    )
    if settings.drift.enabled:
        scheduler.add_job(
            tick_drift_monitor,
            "interval",
            minutes=settings.drift.interval_minutes,
            args=[settings, factory],
            id="drift",
            max_instances=1,
            coalesce=True,
        )
    if settings.retention.images_days > 0:
        scheduler.add_job(
            tick_retention,
            "interval",
            minutes=settings.retention.interval_minutes,
            args=[settings, factory],
            id="retention",
            max_instances=1,
            coalesce=True,
        )
    return scheduler
