"""The per-process HTTP endpoint of ``[metrics]``: /metrics, /healthz and /readyz.

A stdlib ``ThreadingHTTPServer`` in a daemon thread, so every role (an SCP-only process
too) has it without the web stack.  /metrics is the Prometheus text exposition format of
the process's own registry; /healthz answers 200 while the process runs; /readyz runs the
readiness checks (:func:`dicom_node.ops.metrics.collect.check_readiness`) and answers 200, or
503 with a JSON body naming each failed check.  No authentication: bind it to a management address.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Info, generate_latest
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import __version__
from dicom_node.config.settings import Settings
from dicom_node.errors import MetricsServerError
from dicom_node.ops.metrics.collect import NodeMetrics, Readiness, StateCollector, check_readiness

log = structlog.get_logger(__name__)


class _Server(ThreadingHTTPServer):
    """Carries what the handler needs (no module state)."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        readiness: Callable[[], Readiness],
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry, self.readiness = registry, readiness
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "dicom-node"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
            elif path == "/healthz":
                self._reply(200, "text/plain; charset=utf-8", b"ok\n")
            elif path == "/readyz":
                ready = self.server.readiness()
                self._reply(
                    200 if ready.ready else 503,
                    "application/json",
                    json.dumps(ready.as_json()).encode(),
                )
            else:
                self._reply(
                    404,
                    "text/plain; charset=utf-8",
                    b"not found: try /metrics, /healthz or /readyz\n",
                )
        except Exception as exc:  # a scrape must get an answer, never a dropped connection
            log.error("metrics.request_failed", path=path, error_type=type(exc).__name__)
            self._reply(500, "text/plain; charset=utf-8", b"internal error; see the log\n")

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics.request", request=format % args)


@dataclass
class MetricsServer:
    """A running metrics endpoint and its thread."""

    httpd: _Server
    thread: threading.Thread
    host: str

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def start_metrics_server(
    host: str, port: int, registry: CollectorRegistry, readiness: Callable[[], Readiness]
) -> MetricsServer:
    """Listen on ``host``:``port`` (0: any free port) and serve in a daemon thread."""
    try:
        httpd = _Server((host, port), registry, readiness)
    except OSError as exc:
        raise MetricsServerError(
            f"the metrics endpoint cannot listen on {host}:{port} ({exc.strerror}); check "
            "[metrics] host and port (each process on a host needs its own port)"
        ) from None
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics-http", daemon=True
    )
    thread.start()
    server = MetricsServer(httpd, thread, host)
    log.info("metrics.listening", url=server.url)
    return server


def serve_node_metrics(
    settings: Settings,
    factory: sessionmaker[Session],
    metrics: NodeMetrics,
    roles: tuple[str, ...],
    model_loaded: Callable[[], bool] | None,
    port: int | None = None,
) -> MetricsServer:
    """Add the scrape-time gauges to ``metrics`` and serve them on ``[metrics] host``:``port``
    (``port`` overrides ``[metrics] port``; 0: any free port).  ``model_loaded`` is the
    readiness check of a worker-role process (None: the process analyses nothing)."""
    root = Path(settings.storage.root)
    metrics.registry.register(StateCollector(factory, root))
    Info("dicom_node", "This process: release and roles", registry=metrics.registry).info(
        {"version": __version__, "roles": ",".join(roles)}
    )
    return start_metrics_server(
        settings.metrics.host,
        settings.metrics.port if port is None else port,
        metrics.registry,
        lambda: check_readiness(factory, root, model_loaded),
    )
