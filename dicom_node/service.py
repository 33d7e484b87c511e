"""Start and stop the node's roles in one process: SCP, the worker role (scheduler + worker)
and the web role (the AI worklist and its API, served by uvicorn in a thread).

This module wires the stages together for ``dicom-node serve`` and the demo; it holds no
business rules.  Start-up refuses an unmigrated database and clears temp files a crash left.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import __version__
from dicom_node.config import Settings
from dicom_node.db.migrate import require_head
from dicom_node.db.session import make_engine, make_session_factory
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.delivery import DeliveryWorker
from dicom_node.jobs.worker import Worker
from dicom_node.scheduler import build_scheduler
from dicom_node.scp.server import start_scp
from dicom_node.store import prepare_store
from dicom_node.web.server import start_web_server

log = structlog.get_logger(__name__)

ROLES = ("scp", "worker", "web")


@dataclass
class Node:
    """A running node: its engine, and whichever of SCP and scheduler its roles asked for."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    roles: tuple[str, ...]
    server: Any = None
    scp_context: Any = None
    scheduler: Any = None
    worker: Any = None
    worker_thread: Any = None
    delivery: Any = None
    delivery_thread: Any = None
    web: Any = None
    worker_stop: threading.Event = field(default_factory=threading.Event)
    stopped: bool = field(default=False)

    @property
    def scp_port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def web_url(self) -> str:
        return str(self.web.url)

    def stop(self) -> None:
        """Stop accepting, let running associations finish, stop the ticks, close the engine."""
        if self.stopped:
            return
        self.stopped = True
        if self.web is not None:
            self.web.stop()
        if self.server is not None:
            self.server.shutdown()
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
        self.engine.dispose()
        log.info("node.stopped", roles=list(self.roles))


def start_node(settings: Settings, roles: tuple[str, ...] = ("scp", "worker"),
               port: int | None = None, web_port: int | None = None) -> Node:
    """Check the database, store and model, then start the requested roles (non-blocking).

    ``port`` and ``web_port`` override ``[node] port`` and ``[web] port`` (0: any free port).
    """
    engine = make_engine(settings.database_url, settings.database.busy_timeout_ms)
    try:
        require_head(engine)
        bundle = load_bundle(settings) if "worker" in roles else None
    except Exception:
        engine.dispose()
        raise
    removed = prepare_store(Path(settings.storage.root))
    factory = make_session_factory(engine)
    node = Node(settings=settings, engine=engine, session_factory=factory, roles=roles)
    if "scp" in roles:
        node.server, node.scp_context = start_scp(settings, factory, port=port)
    if "web" in roles:
        try:
            node.web = start_web_server(settings, factory, port=web_port)
        except Exception:
            node.stop()
            raise
    if bundle is not None:
        node.delivery = DeliveryWorker(settings, factory)
        node.worker = Worker(settings, factory, bundle, on_delivery_queued=node.delivery.wake.set)
        node.worker_thread = threading.Thread(target=node.worker.run, args=(node.worker_stop,),
                                              name="analysis-worker", daemon=True)
        node.delivery_thread = threading.Thread(target=node.delivery.run, args=(node.worker_stop,),
                                                name="delivery-worker", daemon=True)
        node.worker_thread.start()
        node.delivery_thread.start()
        node.scheduler = build_scheduler(settings, factory, wake=node.worker.wake.set)
        node.scheduler.start()
    log.info("node.started", version=__version__, roles=list(roles),
             temp_files_removed=removed, ae_title=settings.node.ae_title,
             model=settings.model.name if bundle else None,
             weights_status=bundle.weights_status if bundle else None,
             model_warning=bundle.warning_label if bundle else None,
             web_url=node.web.url if node.web is not None else None)
    return node
