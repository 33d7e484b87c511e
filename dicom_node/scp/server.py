"""Build the Application Entity and start the association servers (plaintext and DICOM TLS).

The only module that touches pynetdicom's process-wide ``_config``.  Accepted: Verification,
and Storage for CR, Digital X-Ray (for presentation and for processing) and Secondary Capture
with every transfer syntax pynetdicom knows, stored as received.  Other storage SOP classes are
accepted and discarded, or not negotiated at all, per ``[scp] other_sop_classes``.
"""

from __future__ import annotations

import functools
import socket
import ssl
from pathlib import Path
from typing import Any

import structlog
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at runtime
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.atna import record_security_alert
from dicom_node.config.settings import PeerSettings, Settings
from dicom_node.errors import TlsConfigError
from dicom_node.ingest import ANALYSED_SOP_CLASSES, discarded_sop_classes
from dicom_node.ops.metrics.collect import NodeMetrics
from dicom_node.scp.handlers import ScpContext, handle_echo, handle_requested, handle_store_counted
from dicom_node.scp.listener import ConnectionGate, GatedAssociationServer, start_gated_server
from dicom_node.scp.tls import TlsAssociationServer, server_context, start_tls_server
from dicom_node.scp.transfers import handle_association_ended, handle_store_noted

log = structlog.get_logger(__name__)


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings: no per-message handler logging (it can be verbose
    and adds nothing our own events do not say)."""
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def resolve_peers(peers: tuple[PeerSettings, ...]) -> dict[str, frozenset[str]]:
    """Map each peer's AE title to the IP addresses its host resolves to."""
    allowed: dict[str, set[str]] = {}
    for peer in peers:
        if not peer.dimse:  # a DICOMweb-only peer never opens an association
            continue
        try:
            infos = socket.getaddrinfo(peer.host, None, proto=socket.IPPROTO_TCP)
            addresses = {str(info[4][0]) for info in infos}
        except OSError:
            log.warning("peer.unresolved", peer=peer.name, host=peer.host)
            addresses = set()
        allowed.setdefault(peer.ae_title.strip(), set()).update(addresses)
    return {title: frozenset(addresses) for title, addresses in allowed.items()}


def build_ae(settings: Settings) -> AE:
    """The node's AE with its accepted presentation contexts and association limits."""
    configure_pynetdicom()
    ae = AE(ae_title=settings.node.ae_title)
    ae.require_called_aet = True
    ae.maximum_associations = settings.scp.max_associations
    ae.network_timeout = settings.scp.network_timeout
    ae.acse_timeout = settings.scp.acse_timeout
    ae.dimse_timeout = settings.scp.dimse_timeout
    ae.maximum_pdu_size = settings.scp.max_pdu_size
    for sop_class in sorted(ANALYSED_SOP_CLASSES):
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    for abstract_syntax in sorted(discarded_sop_classes(settings)):  # [scp] other_sop_classes
        ae.add_supported_context(abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def start_scp(
    settings: Settings,
    session_factory: sessionmaker[Session],
    host: str | None = None,
    port: int | None = None,
    metrics: NodeMetrics | None = None,
) -> tuple[GatedAssociationServer | None, TlsAssociationServer | None, ScpContext]:
    """Start listening (non-blocking): plaintext on ``[node] port`` unless ``[tls] plaintext =
    false``, and DICOM TLS on ``[tls] port`` unless it is 0; ``server_address`` gives each port.

    Both listeners share one AE (so ``max_associations`` counts both), one context and one
    pre-association gate (``max_pending_connections`` counts both; a connection gets
    ``acse_timeout`` to send its A-ASSOCIATE-RQ before it may take an association slot).  The
    caller shuts the servers down, then the context's hash pool.

    Raises
    ------
    TlsConfigError
        The TLS files cannot be used, or no listener would be left.
    """
    if not settings.tls.plaintext and not settings.tls.port:
        raise TlsConfigError("tls.plaintext = false needs a tls.port: no DICOM listener would run")
    tls_context = server_context(settings.tls) if settings.tls.port else None
    ae = build_ae(settings)
    ctx = ScpContext(
        settings=settings,
        session_factory=session_factory,
        storage_root=Path(settings.storage.root),
        analysed_sop_classes=ANALYSED_SOP_CLASSES,
        discarded_sop_classes=discarded_sop_classes(settings),
        peer_addresses=resolve_peers(settings.peers),
        metrics=metrics or NodeMetrics(),
    )
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [ctx]),
        (evt.EVT_C_ECHO, handle_echo, [ctx]),
        (evt.EVT_C_STORE, handle_store_noted, [ctx, handle_store_counted]),
        # instances.received audit rows, once the association is over (whichever comes first).
        (evt.EVT_RELEASED, handle_association_ended, [ctx]),
        (evt.EVT_ABORTED, handle_association_ended, [ctx]),
        (evt.EVT_CONN_CLOSE, handle_association_ended, [ctx]),
    ]
    gate = ConnectionGate.create(
        settings.scp.acse_timeout,
        settings.scp.max_pending_connections,
        functools.partial(record_connection_refused, session_factory),
    )
    host = host or settings.node.host
    server = tls_server = None
    if settings.tls.plaintext:
        address = (host, settings.node.port if port is None else port)
        server = start_gated_server(ae, address, handlers, gate, "AcceptorServer")
        log.info(
            "scp.listening",
            ae_title=settings.node.ae_title,
            host=server.server_address[0],
            port=server.server_address[1],
        )
    if tls_context is not None:
        try:
            tls_server = _start_tls(settings, ae, host, tls_context, handlers, gate)
        except TlsConfigError:
            if server is not None:
                server.shutdown()
            ctx.hash_pool.shutdown()
            raise
    return server, tls_server, ctx


def _start_tls(
    settings: Settings,
    ae: AE,
    host: str,
    tls_context: ssl.SSLContext,
    handlers: list[Any],
    gate: ConnectionGate,
) -> TlsAssociationServer:
    """The DICOM TLS listener on ``[tls] port``; the handshake and the A-ASSOCIATE-RQ together
    get ``[scp] acse_timeout``."""
    tls_server = start_tls_server(ae, (host, settings.tls.port), tls_context, handlers, gate)
    log.info(
        "scp.tls_listening",
        ae_title=settings.node.ae_title,
        host=tls_server.server_address[0],
        port=tls_server.server_address[1],
        min_version=settings.tls.min_version,
        client_certificate=(
            "required"
            if settings.tls.require_client_certificate
            else "verified if sent"
            if settings.tls.ca_certificates
            else "not asked"
        ),
    )
    return tls_server


def record_connection_refused(
    session_factory: sessionmaker[Session],
    peer_address: str,
    peer_port: int,
    reason: str,
    cause: str,
) -> None:
    """Log a connection closed before association (``scp.<reason>``: tls_handshake_failed,
    association_not_negotiated, too_many_pending_connections) and audit it as a security
    alert (no patient data: none has been exchanged yet).  Never raises: the listener keeps
    serving."""
    log.warning(f"scp.{reason}", peer_address=peer_address, peer_port=peer_port, cause=cause)
    record_security_alert(
        session_factory, reason=reason, cause=cause, peer_address=peer_address, peer_port=peer_port
    )
