"""The analysis worker: lease a batch of jobs, run the stages of ``jobs.analysis``, settle each.

A batch is up to ``[model] batch_size`` jobs of the models this worker loaded (an analysis
job names its model): each is selected and prepared on its own, the prepared ones are
classified in one call per model, with the site's operating points for those weights when
``validate thresholds apply`` wrote some, then each is built, written and stored.  A shadow
job's result is stored like any other, but no output object is built for it and nothing is
queued for delivery: nothing of a shadow model can reach PACS.
Leases are renewed before each stage, so a slow batch keeps its jobs.  Whatever a stage
raises settles that job alone (``jobs.loop.JOB_STATE``): a job with nothing to analyse, or
whose image cannot be decoded, still sends its "not analysed" SR, so the PACS hears of every
study.  Below the ``[storage] min_free_mb`` reserve nothing is claimed: due jobs wait.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

import structlog
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.clock import utcnow
from dicom_node.config.models import ModelMode
from dicom_node.config.settings import Settings
from dicom_node.db.models import JobKind, JobState
from dicom_node.db.session import session_scope
from dicom_node.errors import (
    InferenceError,
    InsufficientSpaceError,
    JobLeaseLostError,
    StorageError,
)
from dicom_node.inference.models import ModelBundle
from dicom_node.jobs import analysis
from dicom_node.jobs.analysis import JobResult, PreparedJob
from dicom_node.jobs.loop import JobLoop, RetryPolicy, Settlement, default_worker_id, record_failure
from dicom_node.jobs.queue import Lease, hold_for_space, skip
from dicom_node.jobs.records import WrittenOutput, write_outputs
from dicom_node.jobs.space import is_disk_full, require_free_space
from dicom_node.ops.metrics.collect import NodeMetrics
from dicom_node.validation.thresholds import current_points

log = structlog.get_logger(__name__)


class Worker(JobLoop):
    """Claims analysis jobs in batches of ``[model] batch_size`` and analyses them."""

    kind = JobKind.ANALYSIS
    name = "worker"

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        bundle: ModelBundle | Mapping[str, ModelBundle],
        worker_id: str | None = None,
        poll_seconds: float = 0.5,
        on_delivery_queued: Callable[[], None] = lambda: None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        super().__init__(settings, factory, worker_id or default_worker_id(), poll_seconds, metrics)
        self.bundles = (
            {bundle.model_name: bundle} if isinstance(bundle, ModelBundle) else dict(bundle)
        )
        self.on_delivery_queued = on_delivery_queued

    @property
    def bundle(self) -> ModelBundle:
        """The first configured model: it also analyses jobs queued for no model by name."""
        return next(iter(self.bundles.values()))

    def bundle_for(self, lease: Lease) -> ModelBundle:
        """The model an analysis job was queued for (its target)."""
        return self.bundles.get(lease.target) or self.bundle

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.settings.analysis.backoff_seconds)

    def log_context(self) -> dict[str, object]:
        """The model's warning label (untrained or unverified weights) on every log line."""
        warning = self.bundle.warning_label
        return {"model_warning": warning} if warning else {}

    def run_once(self) -> int:
        """Claim and process one batch; returns how many jobs were claimed.

        Below the disk reserve nothing is claimed (so no attempt is spent): the due jobs are
        pushed back to wait for space, and 0 is returned.  An error that escapes the batch
        (the database went away while recording) gives its held jobs back as failed attempts.
        """
        if self._hold_while_disk_full():
            return 0
        leases = self.claim(self.settings.model.batch_size, (*self.bundles, ""))
        try:
            prepared = [job for job in map(self._prepare, leases) if job is not None]
            self._classify_and_store(prepared)
        except Exception as exc:
            self.release(leases, exc)
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
                    session,
                    kind=self.kind,
                    detail=str(exc),
                    now=utcnow(),
                    first_seconds=self.settings.scheduler.storage_full_retry_seconds,
                )
            if held:
                log.warning("worker.waiting_for_space", jobs=len(held), error=str(exc))
            return True
        except StorageError:
            return False
        return False

    def _prepare(self, lease: Lease) -> PreparedJob | None:
        """Select and prepare one job; a job that cannot be prepared is settled (and left out
        of the batch)."""
        try:
            with session_scope(self.factory) as session:  # rows only: no decoding in a transaction
                selection = analysis.select_for_job(session, lease, self.settings)
            return analysis.prepare_job(
                lease, selection, self.settings, self.bundle_for(lease).card.resolution
            )
        except Exception as exc:
            self.settle(lease, exc)
            return None

    def _classify_and_store(self, prepared: list[PreparedJob]) -> None:
        """One model call per model of the batch."""
        by_model: dict[str, list[PreparedJob]] = {}
        for job in prepared:
            by_model.setdefault(self.bundle_for(job.lease).model_name, []).append(job)
        for name, jobs in by_model.items():
            self._classify_and_store_with(self._with_site_thresholds(self.bundles[name]), jobs)

    def _with_site_thresholds(self, bundle: ModelBundle) -> ModelBundle:
        """The model with the site's latest operating points for its weights, if any (read
        per batch: ``validate thresholds apply`` takes effect without a restart)."""
        with session_scope(self.factory) as session:
            points = current_points(session, bundle.model_name, bundle.weights_sha256)
        if points is None:
            return bundle
        thresholds = tuple(
            points.thresholds.get(label, default) if label else None
            for label, default in zip(bundle.card.labels, bundle.thresholds, strict=True)
        )
        return dataclasses.replace(
            bundle,
            thresholds=thresholds,
            thresholds_source=points.label,
            thresholds_version=f"v{points.version}",
        )

    def _classify_and_store_with(self, bundle: ModelBundle, prepared: list[PreparedJob]) -> None:
        """One model call for the jobs; an ``InferenceError`` in a batch of several is
        retried one image at a time, so one bad image does not fail the others."""
        prepared = [job for job in prepared if self.renewed(job.lease)]
        if not prepared:
            return
        try:
            started = time.perf_counter()
            results = analysis.classify_jobs(bundle, prepared, self.settings.analysis.box_threshold)
            self.metrics.inference(time.perf_counter() - started, len(prepared))
        except Exception as exc:
            if len(prepared) > 1 and isinstance(exc, InferenceError):
                for job in prepared:
                    self._classify_and_store_with(bundle, [job])
                return
            for job in prepared:
                self.settle(job.lease, exc)
            return
        pending = [result.prepared.lease for result in results]
        for result in results:
            # Building outputs takes a while per job: keep the leases of those still waiting.
            pending = [lease for lease in pending if self.renewed(lease)]
            if result.prepared.lease in pending:
                pending.remove(result.prepared.lease)
                self._store(result, bundle)

    def _store(self, result: JobResult, bundle: ModelBundle) -> None:
        """Build and write the outputs (none for a shadow job), store the result and complete
        the job."""
        lease = result.prepared.lease
        shadow = lease.mode == ModelMode.SHADOW
        try:
            built = (
                []
                if shadow
                else analysis.build_outputs(result, bundle, self.settings, self.factory, utcnow())
            )
            written = write_outputs(
                self.storage_root, lease, built, min_free_mb=self.settings.storage.min_free_mb
            )
            analysed_at = utcnow()
            with session_scope(self.factory) as session:
                analysis.store_result(
                    session,
                    result,
                    bundle,
                    storage_root=self.storage_root,
                    now=analysed_at,
                    written=written,
                    peers=() if shadow else self.settings.peers,
                    min_free_mb=self.settings.storage.min_free_mb,
                )
        except Exception as exc:
            self.settle(lease, exc)
            return
        if not shadow:  # time-to-result is the live model's
            self.metrics.analysed(
                self.factory, lease.study_instance_uid, lease.study_revision, analysed_at
            )
        log.info(
            "job.finished",
            job_id=lease.job_id,
            outcome=JobState.DONE,
            study_instance_uid=lease.study_instance_uid,
            model=bundle.model_name,
            mode=lease.mode,
            outputs=len(written),
            positives=[f.label for f in result.findings if f.positive],
        )
        self.on_delivery_queued()

    def not_analysed(self, lease: Lease, exc: BaseException, settlement: Settlement) -> None:
        """End a job that has nothing to analyse (skipped, with its reason) or whose image
        cannot be decoded or read (dead at once), recording its "not analysed" SR (when
        configured) and queueing its deliveries in the same transaction."""
        error = str(exc)
        reason = error if settlement is Settlement.SKIPPED else f"not analysed: {error}"
        try:
            built = (
                []
                if lease.mode == ModelMode.SHADOW  # a shadow model's note is not sent either
                else analysis.not_analysed_outputs(
                    lease, reason, self.bundle_for(lease), self.settings, self.factory, utcnow()
                )
            )
            written = write_outputs(
                self.storage_root, lease, built, min_free_mb=self.settings.storage.min_free_mb
            )
        except (OSError, StorageError, JobLeaseLostError) as again:
            self.settle(lease, _as_write_error(again))  # a full disk waits; others retry
            return
        state = self.record(
            lease, _end_not_analysed, lease, written, self.settings, self.policy, settlement, error
        )
        if state is None:
            return  # the lease was lost: nothing was recorded
        (log.info if state == JobState.SKIPPED else log.warning)(
            "job.finished", job_id=lease.job_id, outcome=state, reason=reason, outputs=len(written)
        )
        if written:
            self.on_delivery_queued()


def _as_write_error(exc: Exception) -> Exception:
    """How a failed write of the "not analysed" SR settles its job: a full disk as it is
    (the job waits), any other ``OSError`` as a retryable ``StorageError``."""
    if isinstance(exc, OSError) and not is_disk_full(exc):
        return StorageError(f"outputs could not be written ({type(exc).__name__})")
    return exc


def _end_not_analysed(
    session: Session,
    lease: Lease,
    written: list[WrittenOutput],
    settings: Settings,
    policy: RetryPolicy,
    settlement: Settlement,
    error: str,
) -> str:
    """Record the "not analysed" outputs and end the job, in one transaction: skipped with
    its reason, or dead with the decoding error."""
    now = utcnow()
    analysis.store_outputs(session, lease, written, settings.peers, now)
    if settlement is Settlement.SKIPPED:
        skip(session, lease, reason=error, now=now)
        return JobState.SKIPPED
    return record_failure(session, lease, error, retryable=False, policy=policy, now=now)
