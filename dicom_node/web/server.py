"""Run the web app with uvicorn in a background thread of the node's process.

The socket is bound before the thread starts, so the port is known (and a busy port fails
loudly) at once.  uvicorn's own log configuration is switched off: its records, the access
log included, go through the node's structured logging (``logs.py``).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config.settings import Settings
from dicom_node.errors import WebServerError
from dicom_node.ingest import IngestContext
from dicom_node.web.app import build_app

START_TIMEOUT_SECONDS = 30.0


@dataclass
class WebServer:
    """A running uvicorn server and its thread."""

    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket
    host: str
    app: FastAPI

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Finish open requests and stop serving."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def start_web_server(
    settings: Settings,
    session_factory: sessionmaker[Session],
    *,
    port: int | None = None,
    ingest: IngestContext | None = None,
) -> WebServer:
    """Serve the worklist and API on ``[web] host``:``port`` (``port`` 0: any free port);
    ``ingest``: the SCP's context, so STOW-RS and C-STORE share their locks."""
    host = settings.web.host
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    wanted = settings.web.port if port is None else port
    try:
        sock.bind((host, wanted))
    except OSError as exc:
        sock.close()
        raise WebServerError(
            f"the web role cannot listen on {host}:{wanted} ({exc.strerror}); "
            "check [web] host and port"
        ) from None
    app = build_app(settings, session_factory, ingest=ingest)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=True,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="web", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        sock.close()
        raise WebServerError("the web server did not start; see the log")
    return WebServer(server, thread, sock, host, app)
