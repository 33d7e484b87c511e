"""The pre-association gate (dicom_node.scp.listener): connections that never complete an
A-ASSOCIATE-RQ within ``[scp] acse_timeout`` are closed, audited, and never take one of
``[scp] max_associations``; over ``max_pending_connections`` a new connection is closed at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.config.settings import ScpSettings
from dicom_node.db.models import AuditEvent
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from tests.conftest import wait_until
from tests.helpers import echo, send_datasets

ACSE_TIMEOUT = 2.0
MAX_ASSOCIATIONS = 10
ABSURD_LENGTH = struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF)  # an A-ASSOCIATE-RQ header, 4 GiB
# A plausible A-ASSOCIATE-RQ start (type 1, 68 bytes, protocol version 1), sent a byte at a time.
DRIP = struct.pack(">BBLHH", 0x01, 0, 68, 1, 0) + b"DICOM_NODE      " + b"\x00" * 52


def _security_alerts(node: Any, reason: str) -> list[dict[str, Any]]:
    with session_scope(node.session_factory) as session:
        rows = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.event_type == "security.alert")
            .order_by(AuditEvent.id)
        ).all()
        alerts = [{"outcome": row.outcome, **json.loads(row.details or "{}")} for row in rows]
    return [alert for alert in alerts if alert.get("reason") == reason]


def _log_events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [
        record.msg
        for record in caplog.records
        if isinstance(record.msg, dict) and record.msg.get("event") == event
    ]


def _connect(port: int, first: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if first:
        sock.sendall(first)
    return sock


def _closed_by_node(sock: socket.socket, within: float) -> bool:
    """True once the node closed ``sock`` (end of stream or reset) within ``within`` seconds;
    an A-ABORT PDU the node sends before closing is read past."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


@contextlib.contextmanager
def _dripping(socks: list[socket.socket], data: bytes) -> Iterator[None]:
    """Send ``data`` one byte per second on every socket (as a slow-drip client) meanwhile."""
    stop = threading.Event()

    def drip() -> None:
        for byte in data:
            for sock in socks:
                with contextlib.suppress(OSError):  # the node closed it: the point of the test
                    sock.send(bytes((byte,)))
            if stop.wait(1.0):
                return

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


STALLS = {  # what each of the ten sends at once, what it drips after, the audited cause
    "one-byte": (b"\x00", b"", "no complete PDU header before the timeout (1 of 6 bytes)"),
    "length-0xFFFFFFFF": (ABSURD_LENGTH, b"", "the A-ASSOCIATE-RQ declares 4294967295 bytes"),
    "slow-drip": (DRIP[:6], DRIP[6:], "no complete A-ASSOCIATE-RQ before the timeout"),
}


@pytest.mark.parametrize("stall", list(STALLS))
def test_stalled_connections_do_not_lock_out_a_configured_peer_and_are_closed_and_audited(
    node_factory: Any, caplog: pytest.LogCaptureFixture, stall: str
) -> None:
    first, drip, expected = STALLS[stall]
    node = node_factory(
        scp=ScpSettings(max_associations=MAX_ASSOCIATIONS, acse_timeout=ACSE_TIMEOUT)
    )
    caplog.set_level(logging.WARNING, logger="dicom_node.scp.server")
    stalled = [_connect(node.scp_port, first) for _ in range(MAX_ASSOCIATIONS)]
    try:
        with _dripping(stalled, drip):
            time.sleep(0.5)  # all ten accepted and stalled (old code: ten association slots)
            assert echo(node.scp_port) == 0
            assert send_datasets(node.scp_port, [make_cxr_dataset(rows=16, columns=16)]) == [0]
            deadline = time.monotonic() + ACSE_TIMEOUT + 10
            assert all(
                _closed_by_node(sock, max(deadline - time.monotonic(), 0.1)) for sock in stalled
            )
    finally:
        for sock in stalled:
            sock.close()
    assert wait_until(
        lambda: len(_security_alerts(node, "association_not_negotiated")) == MAX_ASSOCIATIONS
    )
    alerts = _security_alerts(node, "association_not_negotiated")
    ports = {alert["peer_port"] for alert in alerts}
    assert len(ports) == MAX_ASSOCIATIONS
    assert all(a["peer_address"] == "127.0.0.1" and a["outcome"] == "failure" for a in alerts)
    assert all(expected in alert["cause"] for alert in alerts), alerts
    logged = _log_events(caplog, "scp.association_not_negotiated")
    assert len(logged) == MAX_ASSOCIATIONS
    assert {line["peer_port"] for line in logged} == ports
    assert all(line["peer_address"] == "127.0.0.1" and expected in line["cause"] for line in logged)


def test_over_max_pending_connections_new_ones_are_closed_at_once_and_peers_get_in_later(
    node_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    node = node_factory(scp=ScpSettings(max_pending_connections=4, acse_timeout=ACSE_TIMEOUT))
    caplog.set_level(logging.WARNING, logger="dicom_node.scp.server")
    silent = [_connect(node.scp_port, b"") for _ in range(4)]
    try:
        time.sleep(0.5)  # the four hold every pending slot
        over = _connect(node.scp_port, b"")
        assert _closed_by_node(over, within=1.0)  # closed at once, long before acse_timeout
        over.close()
        assert echo(node.scp_port) is None  # a peer too, while the pool is full
        assert all(_closed_by_node(sock, ACSE_TIMEOUT + 10) for sock in silent)
    finally:
        for sock in silent:
            sock.close()
    assert echo(node.scp_port) == 0  # the slots are free again
    busy = _security_alerts(node, "too_many_pending_connections")
    assert len(busy) == 1  # one row per address per acse_timeout
    assert busy[0]["peer_address"] == "127.0.0.1"
    assert busy[0]["cause"] == "4 connections already negotiating"
    logged = _log_events(caplog, "scp.too_many_pending_connections")
    assert len(logged) == 2 and all(line["peer_address"] == "127.0.0.1" for line in logged)
    assert len(_security_alerts(node, "association_not_negotiated")) == 4


def test_a_tcp_probe_that_closes_without_a_byte_is_not_a_security_alert(node: Any) -> None:
    for _ in range(3):  # a load balancer's TCP health check: connect, close
        socket.create_connection(("127.0.0.1", node.scp_port), timeout=5).close()
    assert echo(node.scp_port) == 0
    time.sleep(0.5)
    assert _security_alerts(node, "association_not_negotiated") == []


def test_a_pdu_other_than_an_associate_request_first_is_aborted_and_audited(node: Any) -> None:
    with _connect(node.scp_port, struct.pack(">BBL", 0x04, 0, 6) + b"\x00" * 6) as sock:
        sock.settimeout(5)
        reply = sock.recv(10)
        assert reply == struct.pack(">BBL", 0x07, 0, 4) + bytes((0, 0, 2, 2))  # A-ABORT,
        assert _closed_by_node(sock, within=5)  # provider, unexpected PDU
    assert wait_until(lambda: len(_security_alerts(node, "association_not_negotiated")) == 1)
    (alert,) = _security_alerts(node, "association_not_negotiated")
    assert alert["cause"] == "the first PDU is of type 0x04, not an A-ASSOCIATE-RQ"
    assert echo(node.scp_port) == 0
