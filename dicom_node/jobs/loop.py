"""What every job loop shares: claim with a lease, renew it, poll, stop, and settle a job.

The analysis worker (``jobs.worker``) and the delivery worker (``jobs.delivery``) are both a
:class:`JobLoop`.  :data:`JOB_STATE` is the one translation from an exception raised while a
job ran to what becomes of the job; :meth:`JobLoop.settle` applies it, fenced on the lease
(``jobs.queue``), so a worker whose lease was rescued changes nothing.  The loop itself never
dies on a job's error or a database outage: leases expire and the jobs come back.
"""

from __future__ import annotations

import abc
import enum
import os
import socket
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Concatenate, ParamSpec, TypeVar

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.models import JobKind
from dicom_node.db.session import session_scope
from dicom_node.errors import (
    DeliveryError,
    DicomNodeError,
    InsufficientSpaceError,
    InvalidInstanceError,
    JobLeaseLostError,
    StorageError,
    TransientDeliveryError,
    UnsupportedStudyError,
)
from dicom_node.jobs.queue import Lease, claim_jobs, extend_lease, fail, wait_for_space
from dicom_node.jobs.space import is_disk_full
from dicom_node.ops.metrics.collect import NodeMetrics

log = structlog.get_logger(__name__)
T = TypeVar("T")
P = ParamSpec("P")


class Settlement(enum.StrEnum):
    """What becomes of a job whose attempt raised."""

    LEASE_LOST = "lease_lost"  # it was rescued meanwhile: nothing is changed
    SKIPPED = "skipped"  # not analysed, for good, with the reason
    UNDECODABLE = "undecodable"  # dead at once; its "not analysed" SR still goes out
    WAITING_FOR_SPACE = "waiting"  # queued again after a doubling wait, attempt given back
    RETRY = "retry"  # failed, retried after backoff; dead when spent
    DEAD = "dead"  # given up at once, with the error
    INTERNAL_ERROR = "internal"  # a bug or an outage not foreseen: logged, then RETRY
    BY_CLASS = "by_class"  # RETRY if the error's class is ``retryable``, else DEAD


# Looked up along the exception's MRO, so the most specific class decides (the families of
# ``dicom_node.errors`` have no rows: they group, they do not translate).  A disk found full
# (the reserve, or ENOSPC/EDQUOT under any class) always waits, whatever the row says.
JOB_STATE: Mapping[type[BaseException], Settlement] = MappingProxyType(
    {
        JobLeaseLostError: Settlement.LEASE_LOST,
        UnsupportedStudyError: Settlement.SKIPPED,
        InvalidInstanceError: Settlement.UNDECODABLE,
        InsufficientSpaceError: Settlement.WAITING_FOR_SPACE,
        TransientDeliveryError: Settlement.RETRY,
        DeliveryError: Settlement.DEAD,
        DicomNodeError: Settlement.BY_CLASS,  # InferenceError, StorageError retry; others die
        Exception: Settlement.INTERNAL_ERROR,
    }
)


def job_state_for(exc: BaseException) -> Settlement:
    """The settlement of a job whose attempt raised ``exc`` (see :data:`JOB_STATE`)."""
    if is_disk_full(exc):
        return Settlement.WAITING_FOR_SPACE
    settlement = next(
        (JOB_STATE[cls] for cls in type(exc).__mro__ if cls in JOB_STATE), Settlement.INTERNAL_ERROR
    )
    if settlement is Settlement.BY_CLASS:
        return Settlement.RETRY if getattr(exc, "retryable", False) else Settlement.DEAD
    return settlement


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed attempt is retried: ``backoff_seconds * 2 ** (attempt - 1)``, at most
    ``max_backoff_seconds``; no retry once the job is ``give_up_after_seconds`` old."""

    backoff_seconds: float
    max_backoff_seconds: float | None = None
    give_up_after_seconds: float | None = None


def record_failure(
    session: Session,
    lease: Lease,
    error: str,
    *,
    retryable: bool,
    policy: RetryPolicy,
    now: datetime,
    min_delay_seconds: float = 0.0,
) -> str:
    """Fail the attempt (``failed`` to retry, or ``dead``) in ``session``; returns the state.

    ``min_delay_seconds``: the retry waits at least this long (a peer's ``Retry-After``)."""
    limit = policy.give_up_after_seconds
    if (
        retryable
        and limit is not None
        and lease.created_at is not None
        and (now - lease.created_at).total_seconds() >= limit
    ):
        error, retryable = f"{error} (gave up after {limit:g} s)", False
    return fail(
        session,
        lease,
        error=error,
        retryable=retryable,
        now=now,
        backoff_seconds=policy.backoff_seconds,
        max_backoff_seconds=policy.max_backoff_seconds,
        min_delay_seconds=min_delay_seconds,
    )


def work_until(
    stop: threading.Event,
    wake: threading.Event,
    poll_seconds: float,
    run_once: Callable[[], int],
    name: str,
) -> None:
    """Call ``run_once`` until ``stop``; when it found no work, sleep until woken or polled.

    A database outage or a bug is logged and the loop goes on: leases expire and the jobs
    of a broken attempt come back.
    """
    while not stop.is_set():
        try:
            worked = run_once()
        except SQLAlchemyError as exc:
            log.error(f"{name}.database_unavailable", error_type=type(exc).__name__)
            worked = 0
        except Exception as exc:  # the loop must outlive any bug; leases will expire
            log.error(
                f"{name}.loop_error",
                error_type=type(exc).__name__,
                stack="".join(traceback.format_tb(exc.__traceback__)),
            )
            worked = 0
        if not worked:
            wake.wait(poll_seconds)
            wake.clear()


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def disk_error(exc: BaseException) -> str:
    """The text a job waiting for space shows: our reserve check's, or the file system's."""
    if isinstance(exc, StorageError):
        return str(exc)
    return f"disk full ({getattr(exc, 'strerror', None) or type(exc).__name__})"


class JobLoop(abc.ABC):
    """Claims jobs of one kind under a lease and settles each by :func:`job_state_for`.

    A subclass sets ``kind`` and ``name`` and implements ``run_once`` (claim, work, return
    how many were claimed) and ``policy``; an analysis loop also overrides ``not_analysed``.
    """

    kind: JobKind
    name: str

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        worker_id: str,
        poll_seconds: float,
        metrics: NodeMetrics | None,
    ) -> None:
        self.settings, self.factory = settings, factory
        self.metrics = metrics or NodeMetrics()
        self.worker_id, self.poll_seconds = worker_id, poll_seconds
        self.wake = threading.Event()
        self.storage_root = Path(settings.storage.root)

    @property
    @abc.abstractmethod
    def policy(self) -> RetryPolicy:
        """When a failed job of this kind is tried again, and when it is given up."""

    @abc.abstractmethod
    def run_once(self) -> int:
        """Claim what is due, work it, settle each job; how many jobs were claimed."""

    def log_context(self) -> dict[str, object]:
        """What every log line of this loop carries besides its worker id."""
        return {}

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; never dies on a job's or the database's error."""
        with structlog.contextvars.bound_contextvars(
            worker_id=self.worker_id, **self.log_context()
        ):
            work_until(stop, self.wake, self.poll_seconds, self.run_once, self.name)

    def claim(self, limit: int, targets: tuple[str, ...] = ()) -> list[Lease]:
        """Lease up to ``limit`` due jobs of this loop's kind (for ``targets`` only, if any)."""
        with session_scope(self.factory) as session:
            return claim_jobs(
                session,
                kind=self.kind,
                worker_id=self.worker_id,
                limit=limit,
                now=utcnow(),
                lease_seconds=self.settings.scheduler.lease_seconds,
                targets=targets,
            )

    def renew(self, lease: Lease) -> None:
        """Push the lease out before the next stage (``JobLeaseLostError`` when it was lost)."""
        with session_scope(self.factory) as session:
            extend_lease(
                session, lease, now=utcnow(), lease_seconds=self.settings.scheduler.lease_seconds
            )

    def renewed(self, lease: Lease) -> bool:
        """Whether the lease was renewed; if not, the job is settled by the error."""
        try:
            self.renew(lease)
        except Exception as exc:
            self.settle(lease, exc)
            return False
        return True

    def record(
        self,
        lease: Lease,
        change: Callable[Concatenate[Session, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None:
        """``change(session, *args, **kwargs)``, fenced, in its own transaction; ``None`` when
        the lease was lost."""
        try:
            with session_scope(self.factory) as session:
                return change(session, *args, **kwargs)
        except JobLeaseLostError:
            self.lease_lost(lease)
            return None

    def settle(self, lease: Lease, exc: BaseException) -> None:
        """Give the job the next state its error calls for (:data:`JOB_STATE`)."""
        settlement = job_state_for(exc)
        if settlement is Settlement.LEASE_LOST:
            self.lease_lost(lease)
        elif settlement in (Settlement.SKIPPED, Settlement.UNDECODABLE):
            self.not_analysed(lease, exc, settlement)
        elif settlement is Settlement.WAITING_FOR_SPACE:
            self.wait_for_space(lease, disk_error(exc))
        elif settlement is Settlement.INTERNAL_ERROR:
            log.error(
                "job.internal_error",
                job_id=lease.job_id,
                error_type=type(exc).__name__,
                stack="".join(traceback.format_tb(exc.__traceback__)),
            )
            self.fail(lease, f"internal error ({type(exc).__name__})", retryable=True)
        else:
            self.fail(lease, str(exc), retryable=settlement is Settlement.RETRY)

    def not_analysed(self, lease: Lease, exc: BaseException, settlement: Settlement) -> None:
        """A job with nothing to analyse; a loop that does not analyse lets it die."""
        self.fail(lease, str(exc), retryable=False)

    def fail(self, lease: Lease, error: str, *, retryable: bool) -> None:
        """Fail the attempt: retried per :attr:`policy` while it may be, else dead."""
        state = self.record(
            lease,
            record_failure,
            lease,
            error,
            retryable=retryable,
            policy=self.policy,
            now=utcnow(),
        )
        log.warning(
            "job.finished", job_id=lease.job_id, outcome=state, error=error, attempt=lease.attempt
        )

    def wait_for_space(self, lease: Lease, detail: str) -> None:
        """The disk is full: the job waits, queued, its attempt given back."""
        delay = self.record(
            lease,
            wait_for_space,
            lease,
            detail=detail,
            now=utcnow(),
            first_seconds=self.settings.scheduler.storage_full_retry_seconds,
        )
        if delay is not None:
            log.warning(
                "job.waiting_for_space",
                job_id=lease.job_id,
                attempt=lease.attempt,
                error=detail,
                retry_in_seconds=delay,
            )

    def lease_lost(self, lease: Lease) -> None:
        log.warning("job.lease_lost", job_id=lease.job_id, attempt=lease.attempt)

    def release(self, leases: list[Lease], exc: Exception) -> None:
        """Give back the jobs still held after an error escaped a batch (a database outage
        while recording an outcome, say) as failed attempts, so they are retried after the
        backoff rather than left running until their leases expire.  A job that already
        reached its outcome is fenced off and stays as it is."""
        error = f"attempt interrupted ({type(exc).__name__})"
        for lease in leases:
            try:
                with session_scope(self.factory) as session:
                    state = record_failure(
                        session, lease, error, retryable=True, policy=self.policy, now=utcnow()
                    )
            except JobLeaseLostError:
                continue  # it reached its outcome before the error
            except Exception as again:  # the database is still away: the lease will expire
                log.error("job.not_released", job_id=lease.job_id, error_type=type(again).__name__)
                continue
            log.warning("job.released", job_id=lease.job_id, outcome=state, error=error)
