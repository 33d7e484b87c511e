"""The analysis worker: claim a batch, run the pipeline, record each job's outcome.

One of the three places errors are translated, here into job states: ``UnsupportedStudyError``
skips the job with its reason; ``InvalidInstanceError`` (the image cannot be read or decoded)
makes it dead at once, still with its "not analysed" SR, so the PACS hears of every study; a
full disk (below ``[storage] min_free_mb``, or ENOSPC) makes it wait, queued, without spending
an attempt; other ``DicomNodeError``s fail it (retried with backoff while retryable and
attempts remain, else dead); an unexpected exception is logged with its stack and retried like
a transient failure until ``max_attempts``, then the job is dead.  A lost lease (the job was
rescued) changes nothing.  The loop itself never dies on a job's error.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.models import JobKind
from dicom_node.db.session import session_scope
from dicom_node.errors import (DicomNodeError, InferenceError, InsufficientSpaceError,
                               InvalidInstanceError, JobLeaseLostError, StorageError,
                               UnsupportedStudyError)
from dicom_node.inference.models import ModelBundle
from dicom_node.events import record_event
from dicom_node.ops.metrics.collect import NodeMetrics
from dicom_node.jobs.outputs import build_not_analysed, build_result_outputs
from dicom_node.jobs.pipeline import (PreparedJob, algorithm_of, classify_jobs, prepare_job,
                                      select_for_job, store_result)
from dicom_node.outputs.build import BuiltOutput
from dicom_node.outputs.records import WrittenOutput, record_outputs, write_outputs
from dicom_node.jobs.queue import (Lease, claim_jobs, extend_lease, fail, hold_for_space, skip,
                                   wait_for_space)
from dicom_node.jobs.space import is_disk_full, require_free_space

log = structlog.get_logger(__name__)
T = TypeVar("T")


def work_until(stop: threading.Event, wake: threading.Event, poll_seconds: float,
               run_once: Callable[[], int], name: str) -> None:
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
            log.error(f"{name}.loop_error", error_type=type(exc).__name__,
                      stack="".join(traceback.format_tb(exc.__traceback__)))
            worked = 0
        if not worked:
            wake.wait(poll_seconds)
            wake.clear()


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class Worker:
    """Claims analysis jobs in batches of ``[model] batch_size`` and analyses them."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], bundle: ModelBundle,
                 worker_id: str | None = None, poll_seconds: float = 0.5,
                 on_delivery_queued: Callable[[], None] = lambda: None,
                 metrics: NodeMetrics | None = None) -> None:
        self.settings, self.factory, self.bundle = settings, factory, bundle
        self.metrics = metrics or NodeMetrics()
        self.worker_id = worker_id or default_worker_id()
        self.poll_seconds = poll_seconds
        self.wake = threading.Event()
        self.storage_root = Path(settings.storage.root)
        self.on_delivery_queued = on_delivery_queued

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; a database outage waits and tries again."""
        context = {"model_warning": self.bundle.warning_label} if self.bundle.warning_label else {}
        with structlog.contextvars.bound_contextvars(worker_id=self.worker_id, **context):
            work_until(stop, self.wake, self.poll_seconds, self.run_once, "worker")

    def run_once(self) -> int:
        """Claim and process one batch; returns how many jobs were claimed.

        Below the disk reserve nothing is claimed (so no attempt is spent): the due jobs are
        pushed back to wait for space, and 0 is returned.
        """
        if self._hold_while_disk_full():
            return 0
        with session_scope(self.factory) as session:
            leases = claim_jobs(session, kind=JobKind.ANALYSIS.value, worker_id=self.worker_id,
                                limit=self.settings.model.batch_size, now=utcnow(),
                                lease_seconds=self.settings.scheduler.lease_seconds)
        try:
            prepared = [job for job in map(self._prepare, leases) if job is not None]
            if prepared:
                self._classify_and_store(prepared)
        except Exception as exc:
            self._release(leases, exc)
            raise
        return len(leases)

    def _hold_while_disk_full(self) -> bool:
        """Whether the storage root is below ``[storage] min_free_mb``; if so the due analysis
        jobs wait (``hold_for_space``).  A root whose free space cannot be read is left to the
        jobs, which fail with that error."""
        try:
            require_free_space(self.storage_root, self.settings.storage.min_free_mb)
        except InsufficientSpaceError as exc:
            with session_scope(self.factory) as session:
                held = hold_for_space(
                    session, kind=JobKind.ANALYSIS.value, detail=str(exc), now=utcnow(),
                    first_seconds=self.settings.scheduler.storage_full_retry_seconds)
            if held:
                log.warning("worker.waiting_for_space", jobs=len(held), error=str(exc))
            return True
        except StorageError:
            return False
        return False

    def _release(self, leases: list[Lease], exc: Exception) -> None:
        """Give back the batch's jobs still held after an error escaped it (a database outage
        while recording an outcome, say) as failed attempts, so they are retried after the
        backoff rather than left running until their leases expire.  A job that already
        reached its outcome is fenced off and stays as it is."""
        error = f"attempt interrupted ({type(exc).__name__})"
        backoff = self.settings.analysis.backoff_seconds
        for lease in leases:
            try:
                with session_scope(self.factory) as session:
                    state = fail(session, lease, error=error, retryable=True, now=utcnow(),
                                 backoff_seconds=backoff)
            except JobLeaseLostError:
                continue  # it reached its outcome before the error
            except Exception as again:  # the database is still away: the lease will expire
                log.error("job.not_released", job_id=lease.job_id,
                          error_type=type(again).__name__)
                continue
            log.warning("job.released", job_id=lease.job_id, outcome=state, error=error)

    def _prepare(self, lease: Lease) -> PreparedJob | None:
        with self.job_attempt(lease):
            with session_scope(self.factory) as session:  # rows only: no decoding in a transaction
                selection = select_for_job(session, lease, self.settings)
            return prepare_job(lease, selection, self.settings, self.bundle.entry.resolution)
        return None

    def _renew(self, leases: list[Lease]) -> list[Lease]:
        """Extend each lease before the next stage; drop the ones that were lost."""
        kept = []
        for lease in leases:
            with self.job_attempt(lease), session_scope(self.factory) as session:
                extend_lease(session, lease, now=utcnow(),
                             lease_seconds=self.settings.scheduler.lease_seconds)
                kept.append(lease)
        return kept

    def _classify_and_store(self, prepared: list[PreparedJob]) -> None:
        held = {lease.job_id for lease in self._renew([job.lease for job in prepared])}
        prepared = [job for job in prepared if job.lease.job_id in held]
        if not prepared:
            return
        try:
            started = time.perf_counter()
            results = classify_jobs(self.bundle, prepared, self.settings.analysis.box_threshold)
            self.metrics.inference(time.perf_counter() - started, len(prepared))
        except Exception as exc:
            if len(prepared) > 1 and isinstance(exc, InferenceError):
                for job in prepared:  # isolate the image that breaks the batch
                    self._classify_and_store([job])
                return
            for job in prepared:
                with self.job_attempt(job.lease):
                    raise exc
            return
        for index, result in enumerate(results):
            lease = result.prepared.lease
            # Building outputs takes a while per job: keep the leases of those still waiting.
            held = {kept.job_id for kept in self._renew([r.prepared.lease for r in results[index:]])}
            if lease.job_id not in held:
                continue
            with self.job_attempt(lease):
                written = self._outputs_or_event(lease, lambda: build_result_outputs(
                    result, self.bundle, self.settings, self.factory, utcnow()))
                analysed_at = utcnow()
                with session_scope(self.factory) as session:
                    store_result(session, result, self.bundle, storage_root=self.storage_root,
                                 now=analysed_at, written=written, peers=self.settings.peers,
                                 min_free_mb=self.settings.storage.min_free_mb)
                self.metrics.analysed(self.factory, lease.study_instance_uid,
                                      lease.study_revision, analysed_at)
                log.info("job.finished", job_id=lease.job_id, outcome="done",
                         study_instance_uid=lease.study_instance_uid, outputs=len(written),
                         positives=[f.label for f in result.findings if f.positive])
                self.on_delivery_queued()

    def _write_outputs(self, lease: Lease, build: Callable[[], list[BuiltOutput]]
                       ) -> list[WrittenOutput]:
        """Build and durably write a job's outputs (before the transaction that records them),
        keeping the ``[storage] min_free_mb`` reserve (``InsufficientSpaceError``)."""
        outputs = build()
        require_free_space(self.storage_root, self.settings.storage.min_free_mb,
                           sum(len(output.data) for output in outputs))
        return write_outputs(self.storage_root, lease.study_instance_uid, outputs,
                             attempt=f"job{lease.job_id}a{lease.attempt}")

    @contextlib.contextmanager
    def job_attempt(self, lease: Lease) -> Iterator[None]:
        """Translate whatever the stages raise into the job's next state."""
        try:
            yield
        except JobLeaseLostError:
            log.warning("job.lease_lost", job_id=lease.job_id, attempt=lease.attempt)
        except UnsupportedStudyError as exc:
            self._skipped(lease, str(exc))
        except InvalidInstanceError as exc:  # the image cannot be read or decoded: for good
            self._undecodable(lease, str(exc))
        except (StorageError, OSError) as exc:
            if is_disk_full(exc):
                self._wait_for_space(lease, _disk_error(exc))
            elif isinstance(exc, StorageError):
                self._fail(lease, str(exc), exc.retryable)
            else:
                self._internal_error(lease, exc)
        except DicomNodeError as exc:
            self._fail(lease, str(exc), exc.retryable)
        except Exception as exc:  # a bug, or an outage we did not foresee: retry, then dead
            self._internal_error(lease, exc)

    def _internal_error(self, lease: Lease, exc: Exception) -> None:
        log.error("job.internal_error", job_id=lease.job_id, error_type=type(exc).__name__,
                  stack="".join(traceback.format_tb(exc.__traceback__)))
        self._fail(lease, f"internal error ({type(exc).__name__})", True)

    def _skipped(self, lease: Lease, reason: str) -> None:
        """Record the job as not analysed (skipped), with its "not analysed" SR when configured."""
        self._not_analysed(lease, reason, lambda s: _skip(s, lease, reason))

    def _undecodable(self, lease: Lease, error: str) -> None:
        """The image cannot be decoded (or read): the job is dead with that error, and the
        "not analysed" SR naming it still goes out, so the PACS hears of the study."""
        self._not_analysed(lease, f"not analysed: {error}", lambda s: fail(
            s, lease, error=error, retryable=False, now=utcnow(),
            backoff_seconds=self.settings.analysis.backoff_seconds))

    def _not_analysed(self, lease: Lease, reason: str, finish: Callable[[Session], str]) -> None:
        """End the job by ``finish``, recording its "not analysed" SR (when configured) and
        queueing its deliveries in the same transaction.  A full disk makes the job wait; any
        other disk error writing that SR fails the attempt (retried), as it would for results."""
        try:
            written = self._not_analysed_outputs(lease, reason)
        except (OSError, StorageError) as exc:
            if is_disk_full(exc):
                self._wait_for_space(lease, _disk_error(exc))
            else:
                self._fail(lease, str(exc) if isinstance(exc, StorageError)
                           else f"outputs could not be written ({type(exc).__name__})", True)
            return
        except JobLeaseLostError:
            log.warning("job.lease_lost", job_id=lease.job_id, attempt=lease.attempt)
            return
        state = self._record(lease, lambda s: _record_not_analysed(s, lease, written,
                                                                   self.settings, finish))
        if state is None:
            return  # the lease was lost: nothing was recorded
        (log.info if state == "skipped" else log.warning)(
            "job.finished", job_id=lease.job_id, outcome=state, reason=reason,
            outputs=len(written))
        if written:
            self.on_delivery_queued()

    def _wait_for_space(self, lease: Lease, detail: str) -> None:
        """The disk is full: the job waits, queued, its attempt given back (``wait_for_space``)."""
        delay = self._record(lease, lambda s: wait_for_space(
            s, lease, detail=detail, now=utcnow(),
            first_seconds=self.settings.scheduler.storage_full_retry_seconds))
        if delay is not None:
            log.warning("job.waiting_for_space", job_id=lease.job_id, attempt=lease.attempt,
                        error=detail, retry_in_seconds=delay)

    def _not_analysed_outputs(self, lease: Lease, reason: str) -> list[WrittenOutput]:
        """The "not analysed" SR, when configured (``[outputs] report_not_analysed``)."""
        if not self.settings.outputs.report_not_analysed:
            return []
        return self._outputs_or_event(lease, lambda: build_not_analysed(
            lease, reason, algorithm_of(self.bundle), self.settings, self.factory, utcnow()))

    def _outputs_or_event(self, lease: Lease, build: Callable[[], list[BuiltOutput]]
                          ) -> list[WrittenOutput]:
        """Build and write the outputs; if they cannot be built the job's result still stands,
        and an ``outputs.not_built`` event says why.  Disk errors are raised: a full disk makes
        the job wait, any other fails the attempt (retried)."""
        try:
            return self._write_outputs(lease, build)
        except (OSError, StorageError, JobLeaseLostError):
            raise
        except Exception as exc:  # a source highdicom refuses, an unreadable earlier output
            error = str(exc) if isinstance(exc, DicomNodeError) else type(exc).__name__
            log.warning("outputs.not_built", job_id=lease.job_id, error=error)
            self._record(lease, lambda s: record_event(
                s, "outputs.not_built", now=utcnow(), level="warning", job_id=lease.job_id,
                study_instance_uid=lease.study_instance_uid, error=error))
            return []

    def _fail(self, lease: Lease, error: str, retryable: bool) -> None:
        state = self._record(lease, lambda s: fail(
            s, lease, error=error, retryable=retryable, now=utcnow(),
            backoff_seconds=self.settings.analysis.backoff_seconds))
        log.warning("job.finished", job_id=lease.job_id, outcome=state, error=error,
                    attempt=lease.attempt)

    def _record(self, lease: Lease, change: Callable[[Session], T]) -> T | None:
        try:
            with session_scope(self.factory) as session:
                return change(session)
        except JobLeaseLostError:
            log.warning("job.lease_lost", job_id=lease.job_id, attempt=lease.attempt)
            return None


def _skip(session: Session, lease: Lease, reason: str) -> str:
    skip(session, lease, reason=reason, now=utcnow())
    return "skipped"


def _record_not_analysed(session: Session, lease: Lease, written: list[WrittenOutput],
                         settings: Settings, finish: Callable[[Session], str]) -> str:
    """Record the "not analysed" SR and queue its deliveries, then end the job (one
    transaction)."""
    record_outputs(session, written, job_id=lease.job_id,
                   study_instance_uid=lease.study_instance_uid,
                   study_revision=lease.study_revision, peers=settings.peers, now=utcnow())
    return finish(session)


def _disk_error(exc: BaseException) -> str:
    """The text a waiting job shows: our reserve check's, or the file system's own."""
    if isinstance(exc, StorageError):
        return str(exc)
    return f"disk full ({getattr(exc, 'strerror', None) or type(exc).__name__})"
