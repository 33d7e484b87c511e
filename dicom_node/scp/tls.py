"""DICOM TLS for the listener: its ``ssl.SSLContext`` and the TLS association server.

The listener presents this node's certificate and follows the same BCP 195 profile as the
sender (PS3.15 B.9, RFC 9325; :mod:`dicom_node.scu.tls`, whose certificate loading it shares).

The listener does the handshake in each connection's own thread, not in pynetdicom's accept
loop (where ``AssociationServer.get_request`` would do it), so a client that connects and says
nothing cannot stall the port; the handshake shares the pre-association gate's deadline and
pool (``dicom_node.scp.listener``), and every failed handshake is refused as
``tls_handshake_failed``.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from pynetdicom import AE

from dicom_node.config.operations import TlsSettings
from dicom_node.errors import TlsConfigError
from dicom_node.scp.listener import (
    ConnectionGate,
    GatedAssociationServer,
    Refusal,
    start_gated_server,
)
from dicom_node.scu.tls import base_context, describe_tls_error, load_ca, load_own_certificate


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The TLS listener's context: our certificate, and the client certificate policy.

    With ``ca_certificates`` set, a client certificate is verified against it: required when
    ``require_client_certificate``, else checked only if the client sends one.

    Raises
    ------
    TlsConfigError
        A file is missing, unreadable, not PEM, encrypted, or the key is not the certificate's.
    """
    if not tls.certificate or not tls.private_key:
        raise TlsConfigError(
            f"tls.certificate and tls.private_key must be set when tls.port = "
            f"{tls.port} (the TLS listener presents this node's certificate)"
        )
    if tls.require_client_certificate and not tls.ca_certificates:
        raise TlsConfigError(
            "tls.require_client_certificate = true needs tls.ca_certificates "
            "(the CA bundle that signs the senders' certificates)"
        )
    context = base_context(ssl.PROTOCOL_TLS_SERVER, tls)
    load_own_certificate(context, tls)
    if tls.ca_certificates:
        load_ca(context, tls.ca_certificates)
        context.verify_mode = (
            ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
        )
    return context


class TlsAssociationServer(GatedAssociationServer):
    """The gated server (:mod:`dicom_node.scp.listener`) with the TLS handshake in the
    connection's thread, inside the same ``acse_timeout`` deadline as the A-ASSOCIATE-RQ.

    Connections still in their handshake are cut when the server closes, so stopping the node
    does not wait for a client that says nothing.
    """

    def secure(
        self, request: socket.socket, client_address: Any, deadline: float
    ) -> ssl.SSLSocket | Refusal:
        """The handshaken socket, or a refusal: ``tls_handshake_failed``, or a quiet close
        when the client closed without a byte."""
        assert self.ssl_context is not None
        tls_socket = None
        try:
            # CPython's handshake and reads hold the whole timeout as one deadline.
            request.settimeout(max(deadline - time.monotonic(), 0.001))
            if request.recv(1, socket.MSG_PEEK) == b"":
                # A TCP health check or port scan (connect, close): not a failed handshake,
                # and an audit row every few seconds from a load balancer would bury real alerts.
                return Refusal(request)
            tls_socket = self.ssl_context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
            with self.tracking(tls_socket):
                tls_socket.do_handshake()
        except (ssl.SSLError, OSError) as exc:  # silence (timeout), a reset, a bad hello
            return Refusal(tls_socket or request, "tls_handshake_failed", describe_tls_error(exc))
        return tls_socket


def start_tls_server(
    ae: AE,
    address: tuple[str, int],
    context: ssl.SSLContext,
    evt_handlers: list[Any],
    gate: ConnectionGate,
) -> TlsAssociationServer:
    """Start a TLS listener for ``ae`` in a daemon thread, as ``AE.start_server(block=False)``.

    Raises TlsConfigError when the port cannot be bound.
    """
    try:
        server = start_gated_server(
            ae,
            address,
            evt_handlers,
            gate,
            "AcceptorServer-tls",
            server_class=TlsAssociationServer,
            ssl_context=context,
        )
    except OSError as exc:
        raise TlsConfigError(
            f"tls.port = {address[1]}: cannot listen on {address[0]}:"
            f"{address[1]} ({exc.strerror or exc})"
        ) from None
    assert isinstance(server, TlsAssociationServer)
    return server
