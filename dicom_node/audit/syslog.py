"""A copy of every audit row as one RFC 5424 syslog message, for a site's audit repository.

``[audit] syslog`` names the collector: ``udp://HOST:PORT`` (RFC 5426, one message per
datagram), ``tcp://HOST:PORT`` (RFC 6587 octet-counting framing: ``LEN SP MSG``) or
``unix:///PATH`` (a local datagram socket such as ``/dev/log``).  Each message is::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG

PRI is facility 13 ("log audit", RFC 5424 6.2.1) with severity 5 (notice), or 4 (warning)
for a failure or a security alert; MSGID is the event type; there is no STRUCTURED-DATA and
MSG is the event's JSON line, exactly as ``dicom-node audit export`` writes it.

Rows are forwarded only after their transaction commits (a rolled-back row is never sent):
a listener on the node's session factory collects the audit rows each flush inserts and
hands them, on commit, to a queue that a thread owned by the :class:`SyslogForwarder` drains.
A caller never waits on the network; a full queue or an unreachable collector is logged
(never with PHI) and counted, and the database row stays: the table is the record of truth.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.export import format_time, json_line
from dicom_node.audit.trail import FAILURE, SECURITY_ALERT, AuditRecord, as_record
from dicom_node.config.operations import AuditSettings
from dicom_node.db.models import AuditEvent

log = structlog.get_logger(__name__)

FACILITY_LOG_AUDIT = 13  # RFC 5424 Table 1
SEVERITY_WARNING, SEVERITY_NOTICE = 4, 5
_PENDING_KEY = "audit_syslog_pending"
_STOP = object()


@dataclass(frozen=True)
class SyslogTarget:
    """Where messages go: ``scheme`` is udp, tcp or unix."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""


def parse_target(url: str) -> SyslogTarget:
    """``udp://HOST:PORT``, ``tcp://HOST:PORT`` or ``unix:///PATH``; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme == "unix" and parts.path:
        return SyslogTarget("unix", path=parts.path)
    if parts.scheme in ("udp", "tcp") and parts.hostname and parts.port:
        return SyslogTarget(parts.scheme, host=parts.hostname, port=parts.port)
    raise ValueError(
        f"syslog target must be udp://HOST:PORT, tcp://HOST:PORT or unix:///PATH, not {url!r}"
    )


def _printable(text: str, limit: int) -> str:
    """RFC 5424 header fields are 1*N PRINTUSASCII (no spaces); "-" is the nil value."""
    kept = "".join(ch for ch in text if "!" <= ch <= "~")[:limit]
    return kept or "-"


def format_message(record: AuditRecord, *, app_name: str, hostname: str, procid: int) -> bytes:
    """One audit event as an RFC 5424 message (ASCII; MSG is the export's JSON line)."""
    severity = (
        SEVERITY_WARNING
        if (record.outcome == FAILURE or record.event_type == SECURITY_ALERT)
        else SEVERITY_NOTICE
    )
    header = (
        f"<{FACILITY_LOG_AUDIT * 8 + severity}>1 {format_time(record.created_at)} "
        f"{_printable(hostname, 255)} {_printable(app_name, 48)} {procid} "
        f"{_printable(record.event_type, 32)} -"
    )
    return f"{header} {json_line(record)}".encode("ascii")


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 3.4.1 framing for TCP: the message length in octets, a space, the message."""
    return str(len(message)).encode("ascii") + b" " + message


class _Transport:
    """One socket to the collector, opened on first use and reopened after an error."""

    def __init__(self, target: SyslogTarget, timeout: float) -> None:
        self.target, self.timeout = target, timeout
        self.sock: socket.socket | None = None
        self.stream = target.scheme == "tcp"

    def _open(self) -> socket.socket:
        target = self.target
        if target.scheme == "tcp":
            return socket.create_connection((target.host, target.port), timeout=self.timeout)
        if target.scheme == "udp":
            family, kind, proto, _, address = socket.getaddrinfo(
                target.host, target.port, type=socket.SOCK_DGRAM
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.settimeout(self.timeout)
            sock.connect(address)
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(target.path)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EPROTOTYPE:
                raise
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a stream-only /dev/log
            sock.settimeout(self.timeout)
            sock.connect(target.path)
            self.stream = True
        return sock

    def send(self, message: bytes) -> None:
        """Send one message; one reconnect on error, then the OSError goes to the caller."""
        for attempt in (1, 2):
            try:
                if self.sock is None:
                    self.sock = self._open()
                self.sock.sendall(octet_counted(message) if self.stream else message)
                return
            except OSError:
                self.close()
                if attempt == 2:
                    raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class SyslogForwarder:
    """Owns the queue and the thread that sends audit rows to the collector."""

    def __init__(
        self,
        target: SyslogTarget,
        app_name: str,
        hostname: str | None = None,
        timeout: float = 2.0,
        max_queue: int = 10000,
        patient_ids: bool = False,
    ) -> None:
        self.target, self.app_name = target, app_name
        # Syslog travels unencrypted (UDP/TCP) or into the local journal: patient IDs stay in
        # the access-controlled table unless the site asks for them here.
        self.patient_ids = patient_ids
        self.hostname = hostname or socket.gethostname()
        self.transport = _Transport(target, timeout)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self.sent = self.failed = self.dropped = 0
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)

    def start(self) -> SyslogForwarder:
        self._thread.start()
        return self

    def submit(self, records: list[AuditRecord]) -> None:
        """Queue committed rows for sending; never blocks (a full queue drops and counts)."""
        for record in records:
            try:
                self.queue.put_nowait(record)
            except queue.Full:
                self.dropped += 1
                log.warning(
                    "audit.syslog_dropped",
                    event_type=record.event_type,
                    audit_id=record.id,
                    reason="queue full",
                )

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds), then stop the thread."""
        try:
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._thread.is_alive() or not self.queue.empty():
            log.warning("audit.syslog_unsent", queued=self.queue.qsize())
        self.transport.close()

    def _run(self) -> None:
        procid = os.getpid()
        while True:
            record = self.queue.get()
            if record is _STOP:
                return
            if not self.patient_ids and record.patient_id is not None:
                record = dataclasses.replace(record, patient_id=None)
            self._send(
                record,
                format_message(
                    record, app_name=self.app_name, hostname=self.hostname, procid=procid
                ),
            )

    def _send(self, record: AuditRecord, message: bytes) -> None:
        try:
            self.transport.send(message)
        except OSError as exc:
            self.failed += 1
            if not self._failing:  # once per outage, not once per row
                log.error(
                    "audit.syslog_failed",
                    scheme=self.target.scheme,
                    audit_id=record.id,
                    error_type=type(exc).__name__,
                )
            self._failing = True
            return
        self.sent += 1
        if self._failing:
            log.info("audit.syslog_recovered", scheme=self.target.scheme, failed=self.failed)
            self._failing = False


def attach(factory: sessionmaker[Session], forwarder: SyslogForwarder) -> None:
    """Forward every audit row committed through ``factory``'s sessions (only after commit)."""

    def collect(session: Session, _context: Any) -> None:
        # After a flush the rows have their ids, and session.new still lists them.
        rows = [as_record(obj) for obj in session.new if isinstance(obj, AuditEvent)]
        if rows:
            session.info.setdefault(_PENDING_KEY, []).extend(rows)

    def committed(session: Session) -> None:
        rows = session.info.pop(_PENDING_KEY, None)
        if rows:
            forwarder.submit(rows)

    def rolled_back(session: Session) -> None:
        session.info.pop(_PENDING_KEY, None)

    event.listen(factory, "after_flush", collect)
    event.listen(factory, "after_commit", committed)
    event.listen(factory, "after_rollback", rolled_back)


def start_syslog(settings: AuditSettings, factory: sessionmaker[Session]) -> SyslogForwarder | None:
    """The node's forwarder for ``[audit] syslog`` (None when it is off), started and attached."""
    if not settings.syslog:
        return None
    forwarder = SyslogForwarder(
        parse_target(settings.syslog),
        settings.syslog_app_name,
        patient_ids=settings.forward_patient_ids,
    )
    attach(factory, forwarder.start())
    log.info("audit.syslog_started", scheme=forwarder.target.scheme)
    return forwarder
