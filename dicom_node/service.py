"""Start and stop the node's roles in one process: SCP, the worker role (scheduler + worker)
and the web role (the AI worklist and its API, served by uvicorn in a thread).

This module wires the stages together for ``dicom-node serve`` and the demo; it holds no
business rules.  Start-up refuses an unmigrated database, clears temp files a crash left,
writes the audit rows spooled during a database outage (then every
``DRAIN_INTERVAL_SECONDS``), and, before the SCP listens, adopts or quarantines the files a
crash left without a row (:mod:`dicom_node.ops.reconcile`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import __version__
from dicom_node.audit.atna import record_application_activity
from dicom_node.audit.spool import DRAIN_INTERVAL_SECONDS, AuditSpool, attach_spool, tick_drain
from dicom_node.audit.syslog import start_syslog
from dicom_node.config.settings import Settings
from dicom_node.db.migrate import require_head
from dicom_node.db.session import make_engine, make_session_factory
from dicom_node.jobs.delivery import DeliveryWorker
from dicom_node.ops.metrics.collect import NodeMetrics
from dicom_node.ops.metrics.server import serve_node_metrics
from dicom_node.ops.reconcile import ReconcileSummary, reconcile_store
from dicom_node.ops.scaleout import check_clock
from dicom_node.scheduler import build_scheduler
from dicom_node.scp.server import start_scp
from dicom_node.scu.tls import check_peer_tls
from dicom_node.store import prepare_store
from dicom_node.web.server import start_web_server

log = structlog.get_logger(__name__)


@dataclass
class Node:
    """A running node: its engine, and whichever of SCP and scheduler its roles asked for."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    roles: tuple[str, ...]
    server: Any = None  # the plaintext listener ([node] port); None: [tls] plaintext off
    tls_server: Any = None  # the DICOM TLS listener ([tls] port); None when it is 0
    scp_context: Any = None
    scheduler: Any = None
    worker: Any = None
    worker_thread: Any = None
    delivery: Any = None
    delivery_thread: Any = None
    web: Any = None
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    metrics_server: Any = None  # /metrics, /healthz, /readyz; None with [metrics] enabled = false
    worker_stop: threading.Event = field(default_factory=threading.Event)
    stopped: bool = field(default=False)
    audit_syslog: Any = None  # the RFC 5424 copy of the audit trail; None without [audit] syslog
    audit_started: bool = False  # application.started was attempted: stop() records the stop

    @property
    def scp_port(self) -> int:
        """The plaintext listener's port."""
        return int(self.server.server_address[1])

    @property
    def tls_port(self) -> int:
        """The DICOM TLS listener's port."""
        return int(self.tls_server.server_address[1])

    @property
    def web_url(self) -> str:
        return str(self.web.url)

    @property
    def metrics_url(self) -> str:
        """The metrics endpoint's base URL (``/metrics``, ``/healthz``, ``/readyz`` below it)."""
        return str(self.metrics_server.url)

    def worker_running(self) -> bool:
        """The readiness check of the worker role: model loaded and the analysis loop alive."""
        return (
            self.worker is not None
            and self.worker.bundle is not None
            and self.worker_thread is not None
            and self.worker_thread.is_alive()
        )

    def stop(self) -> None:
        """Stop accepting, let running associations finish, stop the ticks, close the engine."""
        if self.stopped:
            return
        self.stopped = True
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.web is not None:
            self.web.stop()
        for server in (self.server, self.tls_server):
            if server is not None:
                server.shutdown()
        if self.scp_context is not None:
            self.scp_context.hash_pool.shutdown(wait=True)
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.worker_thread is not None:
            self.worker_stop.set()
            self.worker.wake.set()
            self.worker_thread.join()  # the current batch finishes; its leases are released
        if self.delivery_thread is not None:
            self.worker_stop.set()
            self.delivery.wake.set()
            self.delivery_thread.join()  # the current send finishes and is recorded
        if self.audit_started:  # last, after the associations' instances.received rows
            record_application_activity(
                self.session_factory, self.settings, started=False, roles=self.roles
            )
        if self.audit_syslog is not None:
            self.audit_syslog.close()
        self.engine.dispose()
        log.info("node.stopped", roles=list(self.roles))


def start_node(
    settings: Settings,
    roles: tuple[str, ...] = ("scp", "worker"),
    port: int | None = None,
    web_port: int | None = None,
    metrics_port: int | None = None,
) -> Node:
    """Check the database, store and model, then start the requested roles (non-blocking).

    ``port``, ``web_port`` and ``metrics_port`` override ``[node] port``, ``[web] port`` and
    ``[metrics] port`` (0: any free port).
    """
    engine = make_engine(settings.database_url, settings.database.busy_timeout_ms)
    try:
        require_head(engine)
        check_clock(engine)  # several nodes compare their clocks through the database
        if "worker" in roles:
            check_peer_tls(settings)  # bad [tls] files stop the start, not the first delivery
        bundle = _load_model(settings) if "worker" in roles else None
    except Exception:
        engine.dispose()
        raise
    factory = make_session_factory(engine)
    node = Node(settings=settings, engine=engine, session_factory=factory, roles=roles)
    node.audit_syslog = start_syslog(settings.audit, factory)
    try:
        reconciled = _prepare_storage(settings, factory, roles)
    except Exception:
        node.stop()
        raise
    if settings.metrics.enabled:
        try:
            node.metrics_server = serve_node_metrics(
                settings,
                factory,
                node.metrics,
                roles,
                node.worker_running if bundle is not None else None,
                port=metrics_port,
            )
        except Exception:
            node.stop()
            raise
    if "scp" in roles:
        try:
            node.server, node.tls_server, node.scp_context = start_scp(
                settings, factory, port=port, metrics=node.metrics
            )
        except Exception:
            node.stop()
            raise
    if "web" in roles:
        try:
            node.web = start_web_server(settings, factory, port=web_port, ingest=node.scp_context)
        except Exception:
            node.stop()
            raise
    if bundle is not None:
        _start_workers(node, settings, factory, bundle)
    _schedule_audit_drain(node)
    node.audit_started = True
    record_application_activity(factory, settings, started=True, roles=roles)
    log.info(
        "node.started",
        version=__version__,
        roles=list(roles),
        temp_files_removed=reconciled.temp_files_removed,
        orphans_adopted=reconciled.adopted,
        orphans_quarantined=reconciled.quarantined,
        ae_title=settings.node.ae_title,
        models={name: b.weights_status for name, b in bundle.items()} if bundle else None,
        model_warning=next(iter(bundle.values())).warning_label if bundle else None,
        web_url=node.web.url if node.web is not None else None,
        metrics_url=node.metrics_server.url if node.metrics_server is not None else None,
    )
    return node


def _prepare_storage(
    settings: Settings, factory: sessionmaker[Session], roles: tuple[str, ...]
) -> ReconcileSummary:
    """Folders and crash leftovers: temp files, audit rows spooled during an outage (written
    before this start's own rows), and, for the SCP role, files without a row."""
    root = Path(settings.storage.root)
    removed = prepare_store(root)
    spool = AuditSpool.under(root)
    attach_spool(factory, spool)
    tick_drain(spool, factory)  # a database still failing leaves them for the tick
    if "scp" not in roles:
        return ReconcileSummary(temp_files_removed=removed)
    return reconcile_store(
        root,
        factory,
        temp_files_removed=removed,
        max_inflated_bytes=settings.scp.max_inflated_mb * 1024 * 1024,
    )


def _load_model(settings: Settings) -> Any:
    """The configured models, by name (:class:`~dicom_node.inference.models.ModelBundle`).

    Imported here, not at the top: torch is loaded only by a process that runs the worker role.
    """
    from dicom_node.inference.models import load_bundles

    return load_bundles(settings)


def _start_workers(
    node: Node, settings: Settings, factory: sessionmaker[Session], bundle: Any
) -> None:
    """Start the analysis and delivery loops and the scheduler that wakes them."""
    from dicom_node.jobs.worker import Worker  # imports the model framework (torch)

    node.delivery = DeliveryWorker(settings, factory, metrics=node.metrics)
    node.worker = Worker(
        settings, factory, bundle, on_delivery_queued=node.delivery.wake.set, metrics=node.metrics
    )
    node.worker_thread = threading.Thread(
        target=node.worker.run, args=(node.worker_stop,), name="analysis-worker", daemon=True
    )
    node.delivery_thread = threading.Thread(
        target=node.delivery.run, args=(node.worker_stop,), name="delivery-worker", daemon=True
    )
    node.worker_thread.start()
    node.delivery_thread.start()
    node.scheduler = build_scheduler(settings, factory, wake=node.worker.wake.set)
    node.scheduler.start()


def _schedule_audit_drain(node: Node) -> None:
    """The audit spool's tick, on the worker role's scheduler or on one of its own."""
    if node.scheduler is None:
        node.scheduler = BackgroundScheduler(timezone="UTC")
        node.scheduler.start()
    spool = AuditSpool.under(Path(node.settings.storage.root))
    node.scheduler.add_job(
        tick_drain,
        "interval",
        seconds=DRAIN_INTERVAL_SECONDS,
        args=[spool, node.session_factory],
        id="audit_spool",
        max_instances=1,
        coalesce=True,
    )
