"""Prometheus metrics of one node process, and the readiness checks behind /readyz.

Each process builds one :class:`NodeMetrics` (``service.start_node``) and passes it to the
SCP context, the analysis worker and the delivery worker.  It owns its own
``CollectorRegistry``: nothing is registered in prometheus_client's process-wide default
registry, so two nodes in one process (the tests) never share or clash.

Counters and histograms are updated where things happen; the queue depth, the free disk
space and the GPU memory are read when Prometheus scrapes (:class:`StateCollector`).  A
metric must never change an outcome: a failed database read for a latency is logged and
the observation skipped; a scrape while the database is down reports ``dicom_node_up 0``.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.clock import as_utc
from dicom_node.db.models import Instance, Job, JobKind, JobState, Output, OutputState
from dicom_node.db.session import session_scope
from dicom_node.ops.metrics.drift import drift_gauges
from dicom_node.scu.send import DELIVERED
from dicom_node.store import TMP_DIR, probe_writable

if TYPE_CHECKING:
    from dicom_node.jobs.queue import Lease

log = structlog.get_logger(__name__)

# From a second (a small study on a quiet node) to a day (a peer down overnight).
LATENCY_BUCKETS = (
    1,
    2,
    5,
    10,
    20,
    30,
    60,
    120,
    300,
    600,
    1200,
    1800,
    3600,
    7200,
    14400,
    28800,
    86400,
)
INFERENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Job states that make up the queue; done, skipped and superseded are history, not depth.
QUEUE_STATES = (
    JobState.QUEUED.value,
    JobState.RUNNING.value,
    JobState.FAILED.value,
    JobState.DEAD.value,
)
# delivery_failures_total outcomes besides the sender's per-object ones (failed: retried;
# rejected: for good): per attempt (attempt_error: nothing could be sent), per job (dead).
ATTEMPT_ERROR, GAVE_UP = "attempt_error", JobState.DEAD.value


@dataclass
class NodeMetrics:
    """The counters and histograms of one process, in their own registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    instances_received: Counter = field(init=False)
    received_bytes: Counter = field(init=False)
    cstore_responses: Counter = field(init=False)
    inference_seconds: Histogram = field(init=False)
    inference_images: Counter = field(init=False)
    received_to_analysed: Histogram = field(init=False)
    analysed_to_delivered: Histogram = field(init=False)
    received_to_delivered: Histogram = field(init=False)
    instances_delivered: Counter = field(init=False)
    delivery_failures: Counter = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.instances_received = Counter(
            "dicom_node_instances_received",
            "Instances received by C-STORE and stored "
            "(new ones; duplicates and discarded classes are not counted)",
            ["sop_class"],
            registry=r,
        )
        self.received_bytes = Counter(
            "dicom_node_received_bytes",
            "Bytes of the stored files of received instances "
            "(preamble, File Meta and data set as received)",
            registry=r,
        )
        self.cstore_responses = Counter(
            "dicom_node_cstore_responses",
            "C-STORE responses sent, by status (PS3.4 B.2.3)",
            ["status"],
            registry=r,
        )
        self.inference_seconds = Histogram(
            "dicom_node_inference_seconds",
            "Time of one batched model forward, with the "
            "heat maps and boxes, per batch (up to [model] batch_size images)",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.inference_images = Counter(
            "dicom_node_inference_images",
            "Images through the model (divide "
            "inference_seconds_sum by this for the time per image)",
            registry=r,
        )
        self.received_to_analysed = self._latency(
            "received_to_analysed",
            "last instance of a study revision received -> its "
            "analysis recorded (includes the study quiet time)",
        )
        self.analysed_to_delivered = self._latency(
            "analysed_to_delivered", "outputs recorded -> all delivered to one peer"
        )
        self.received_to_delivered = self._latency(
            "received_to_delivered", "last instance received -> outputs all delivered to one peer"
        )
        self.instances_delivered = Counter(
            "dicom_node_instances_delivered", "Output objects a peer accepted", ["peer"], registry=r
        )
        self.delivery_failures = Counter(
            "dicom_node_delivery_failures",
            "Delivery failures: outcome failed (an object "
            "not accepted, retried), rejected (refused for good), attempt_error (nothing "
            "could be sent: no association, timeout), dead (the node gave up on the job)",
            ["peer", "outcome"],
            registry=r,
        )

    def _latency(self, name: str, what: str) -> Histogram:
        return Histogram(
            f"dicom_node_{name}_seconds",
            f"Seconds from {what}",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def instance_stored(self, sop_class_uid: str, size_bytes: int) -> None:
        self.instances_received.labels(sop_class=sop_class_uid).inc()
        self.received_bytes.inc(size_bytes)

    def cstore_response(self, status: int) -> None:
        self.cstore_responses.labels(status=f"0x{status:04X}").inc()

    def inference(self, seconds: float, images: int) -> None:
        self.inference_seconds.observe(seconds)
        self.inference_images.inc(images)

    def analysed(
        self,
        factory: sessionmaker[Session],
        study_instance_uid: str,
        study_revision: int,
        analysed_at: datetime,
    ) -> None:
        """Observe received -> analysed for a finished analysis job (never raises)."""
        times = _revision_times(factory, study_instance_uid, study_revision)
        if times is not None and times[0] is not None:
            self.received_to_analysed.observe(_seconds(times[0], analysed_at))

    def delivery_attempt(
        self,
        factory: sessionmaker[Session],
        lease: Lease,
        outcomes: Sequence[str],
        attempt_failed: bool,
        state: str,
        now: datetime,
    ) -> None:
        """Count one delivery attempt's answers; on ``done`` observe its latencies.

        ``outcomes``: the per-object outcome (delivered, failed, rejected) of each answer.
        """
        peer = lease.target
        for outcome in outcomes:
            if outcome == DELIVERED:
                self.instances_delivered.labels(peer=peer).inc()
            else:
                self.delivery_failures.labels(peer=peer, outcome=outcome).inc()
        if attempt_failed:
            self.delivery_failures.labels(peer=peer, outcome=ATTEMPT_ERROR).inc()
        if state == GAVE_UP:
            self.delivery_failures.labels(peer=peer, outcome=GAVE_UP).inc()
        if state != JobState.DONE.value:
            return
        times = _revision_times(factory, lease.study_instance_uid, lease.study_revision)
        if times is None:
            return
        received_at, analysed_at = times
        if received_at is not None:
            self.received_to_delivered.observe(_seconds(received_at, now))
        if analysed_at is not None:
            self.analysed_to_delivered.observe(_seconds(analysed_at, now))


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (as_utc(end) - as_utc(start)).total_seconds())


def _revision_times(
    factory: sessionmaker[Session], study_instance_uid: str, revision: int
) -> tuple[datetime | None, datetime | None] | None:
    """(last instance received, outputs recorded) of a study revision; None if unreadable."""
    try:
        with session_scope(factory) as session:
            received = session.scalar(
                select(func.max(Instance.received_at)).where(
                    Instance.study_instance_uid == study_instance_uid,
                    Instance.study_revision <= revision,
                )
            )
            analysed = session.scalar(
                select(func.max(Output.created_at)).where(
                    Output.study_instance_uid == study_instance_uid,
                    Output.study_revision == revision,
                    Output.state == OutputState.CURRENT.value,
                )
            )
    except SQLAlchemyError as exc:
        log.warning("metrics.latency_not_read", error_type=type(exc).__name__)
        return None
    return received, analysed


class StateCollector:
    """Gauges read at scrape time: queue depth, free disk, GPU memory, database up.

    One ``GROUP BY kind, state`` over the queue states (the ``state`` index), so a scrape
    stays cheap however long the history.  A database error is logged; the scrape then
    reports ``dicom_node_up 0`` and no queue gauges, and the other gauges as usual.
    """

    def __init__(self, factory: sessionmaker[Session], storage_root: Path) -> None:
        self.factory, self.storage_root = factory, storage_root

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily(name, "")
            for name in (
                "dicom_node_up",
                "dicom_node_queue_jobs",
                "dicom_node_storage_free_bytes",
                "dicom_node_gpu_memory_allocated_bytes",
                "dicom_node_gpu_memory_reserved_bytes",
                "dicom_node_model_drift_score",
                "dicom_node_model_drift_alarm",
                "dicom_node_model_drift_z",
            )
        ]

    def collect(self) -> Iterator[Metric]:
        counts = self._queue_counts()
        up = GaugeMetricFamily("dicom_node_up", "1 when this scrape could query the database")
        up.add_metric([], 0 if counts is None else 1)
        yield up
        if counts is not None:
            queue = GaugeMetricFamily(
                "dicom_node_queue_jobs",
                "Jobs by kind (analysis, delivery) and state (queued, running, failed, dead)",
                labels=["kind", "state"],
            )
            for kind in (JobKind.ANALYSIS.value, JobKind.DELIVERY.value):
                for state in QUEUE_STATES:
                    queue.add_metric([kind, state], counts.get((kind, state), 0))
            yield queue
            yield from drift_gauges(self.factory)
        yield from self._disk()
        yield from gpu_memory()

    def _queue_counts(self) -> dict[tuple[str, str], int] | None:
        try:
            with session_scope(self.factory) as session:
                rows = session.execute(
                    select(Job.kind, Job.state, func.count())
                    .where(Job.state.in_(QUEUE_STATES))
                    .group_by(Job.kind, Job.state)
                ).all()
        except SQLAlchemyError as exc:
            log.warning("metrics.database_unavailable", error_type=type(exc).__name__)
            return None
        return {(kind, state): int(count) for kind, state, count in rows}

    def _disk(self) -> Iterator[Metric]:
        try:
            free = shutil.disk_usage(self.storage_root).free
        except OSError as exc:
            log.warning("metrics.disk_unreadable", error=exc.strerror)
            return
        gauge = GaugeMetricFamily(
            "dicom_node_storage_free_bytes", "Free bytes on the file system of [storage] root"
        )
        gauge.add_metric([], free)
        yield gauge


def gpu_memory() -> Iterator[Metric]:
    """CUDA memory per device, only where torch is already loaded (never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    allocated = GaugeMetricFamily(
        "dicom_node_gpu_memory_allocated_bytes",
        "GPU memory held by tensors, per CUDA device",
        labels=["device"],
    )
    reserved = GaugeMetricFamily(
        "dicom_node_gpu_memory_reserved_bytes",
        "GPU memory reserved by the caching allocator, per CUDA device",
        labels=["device"],
    )
    for index in range(torch.cuda.device_count()):
        # Both read the allocator's statistics: 0, and no CUDA context, on an unused device.
        allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
        reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
    yield allocated
    yield reserved


@dataclass(frozen=True)
class Readiness:
    """The outcome of the readiness checks: each check's name, and why the failed ones failed."""

    checked: tuple[str, ...]
    failures: dict[str, str]

    @property
    def ready(self) -> bool:
        return not self.failures

    def as_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "checks": {name: self.failures.get(name, "ok") for name in self.checked},
            "failed": sorted(self.failures),
        }


def check_readiness(
    factory: sessionmaker[Session],
    storage_root: Path,
    model_loaded: Callable[[], bool] | None = None,
) -> Readiness:
    """database: ``SELECT 1`` works; storage: a temp file in the store can be written,
    fsynced and deleted; model (only with ``model_loaded``, the worker role): it is loaded."""
    checks: dict[str, Callable[[], str | None]] = {
        "database": lambda: _database_failure(factory),
        "storage": lambda: _storage_failure(storage_root),
    }
    if model_loaded is not None:
        checks["model"] = lambda: None if model_loaded() else "the model is not loaded"
    failures = {name: reason for name, check in checks.items() if (reason := check())}
    return Readiness(tuple(checks), failures)


def _database_failure(factory: sessionmaker[Session]) -> str | None:
    try:
        with session_scope(factory) as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return f"database unavailable ({type(exc).__name__})"
    return None


def _storage_failure(root: Path) -> str | None:
    # Named as the store's own temp files, so one left by a crash is cleaned up at start.
    try:
        probe_writable(
            root / TMP_DIR, f"{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex}.ready"
        )
    except OSError as exc:
        return f"storage root not writable ({exc.strerror or type(exc).__name__})"
    return None
