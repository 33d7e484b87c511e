"""DICOM TLS for the associations this node opens: the sender's ``ssl.SSLContext``, and the
certificate and CA loading the listener's context (:mod:`dicom_node.scp.tls`) shares.

DICOM secures an association by running the Upper Layer over TLS (PS3.15 B.1, the Basic TLS
Secure Transport Connection Profile; PS3.8 9.1.1); the node follows the Non-downgrading BCP 195
profile (PS3.15 B.9, RFC 9325): TLS 1.2 or 1.3 only, and for TLS 1.2 only forward-secret
AEAD suites (ECDHE with AES-GCM or ChaCha20-Poly1305).  TLS 1.3 suites are OpenSSL's, all AEAD.

Hostname checking (sending): the peer's certificate must be signed by ``[tls]
ca_certificates`` (else the system store) AND name the peer's configured ``host`` in its
subjectAltName, as a DNS name or, for a peer configured by IP address, as an IP address
(RFC 9325 6.3 / RFC 6125).  Without the name check any certificate the CA ever issued, for
example a modality's, could stand in for the PACS.

This module imports nothing of the listener: the listener's side imports it.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from dicom_node.config.operations import TlsSettings
from dicom_node.config.settings import PeerSettings, Settings
from dicom_node.errors import TlsConfigError

# RFC 9325 4.2 (BCP 195) recommended TLS 1.2 suites, with ChaCha20 for hosts without AES-NI.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS"
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class _RecordingSocket(ssl.SSLSocket):
    """An SSLSocket that keeps its handshake error on its context, for the sender's message.

    pynetdicom catches the error of a client handshake and reports only "no association".
    In TLS 1.3 the server judges our certificate after the client's side of the handshake is
    done, so its refusal arrives as an alert on the first read: recorded too.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLError, OSError) as exc:
            self.context.handshake_error = describe_tls_error(exc)  # type: ignore[attr-defined]
            raise

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        try:
            return super().read(len, buffer)
        except ssl.SSLError as exc:
            self.context.handshake_error = describe_tls_error(exc)  # type: ignore[attr-defined]
            raise


class ClientContext(ssl.SSLContext):
    """The sender's context: remembers why its last handshake failed (``handshake_error``)."""

    sslsocket_class = _RecordingSocket
    handshake_error: str | None = None


def client_context(tls: TlsSettings) -> ClientContext:
    """The context for associations this node opens to peers with ``tls = true``.

    Verifies the peer's certificate against ``ca_certificates`` (else the system store) and its
    host name (see the module docstring); presents our certificate when one is configured.
    """
    context = base_context(ssl.PROTOCOL_TLS_CLIENT, tls, ClientContext)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if tls.ca_certificates:
        load_ca(context, tls.ca_certificates)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate or tls.private_key:
        load_own_certificate(context, tls)
    return context  # type: ignore[return-value]


def peer_tls_args(tls: TlsSettings, peer: PeerSettings) -> tuple[ClientContext, str] | None:
    """pynetdicom's ``tls_args`` for ``peer``: None for a plaintext peer.

    A fresh context per association, so renewed certificate files are used without a restart.
    """
    if not peer.tls:
        return None
    return client_context(tls), peer.host


def check_peer_tls(settings: Settings) -> None:
    """Build the sending context once if any results peer uses TLS, so bad files are found
    at start-up.  Raises TlsConfigError."""
    if any(peer.tls and peer.send_results for peer in settings.peers):
        client_context(settings.tls)


def handshake_error(tls_args: tuple[ClientContext, str] | None) -> str | None:
    """Why the last handshake made with ``tls_args`` failed, or None."""
    return None if tls_args is None else tls_args[0].handshake_error


def describe_tls_error(exc: BaseException) -> str:
    """A one-line, patient-data-free account of a failed handshake for logs and the audit."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "no TLS handshake before the timeout"
    if isinstance(exc, (ConnectionError, ssl.SSLEOFError)) or not str(exc):
        return "connection closed during the TLS handshake"
    return f"{type(exc).__name__}: {exc}"


def base_context(protocol: int, tls: TlsSettings, cls: type = ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2+ (or 1.3 only) and the BCP 195 suites; never an older protocol."""
    context = cls(protocol)
    context.minimum_version = VERSIONS.get(tls.min_version, ssl.TLSVersion.TLSv1_2)
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION  # RFC 9325 3.3, 3.5
    return context


def _read_pem(key: str, path: str, kind: str) -> str:
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise TlsConfigError(f"{key} = {path!r}: cannot be read ({exc.strerror or exc})") from None
    if f"{kind}-----" not in text:  # BEGIN CERTIFICATE, BEGIN (RSA |EC |ENCRYPTED )PRIVATE KEY
        raise TlsConfigError(f"{key} = {path!r}: not a PEM file with a {kind.lower()}")
    return text


def load_own_certificate(context: ssl.SSLContext, tls: TlsSettings) -> None:
    """Present our ``[tls]`` certificate and key; raises TlsConfigError naming the file."""
    if not tls.certificate or not tls.private_key:
        missing = "tls.private_key" if tls.certificate else "tls.certificate"
        raise TlsConfigError(f"{missing} is empty: tls.certificate and tls.private_key go together")
    _read_pem("tls.certificate", tls.certificate, "CERTIFICATE")
    key_text = _read_pem("tls.private_key", tls.private_key, "PRIVATE KEY")
    if "ENCRYPTED" in key_text:
        raise TlsConfigError(
            f"tls.private_key = {tls.private_key!r}: the key is encrypted; the "
            "node cannot ask for a passphrase (openssl pkey -in KEY -out PLAIN)"
        )
    try:
        # password: never prompt on a terminal (the node runs as a service).
        context.load_cert_chain(tls.certificate, tls.private_key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(
                f"tls.private_key = {tls.private_key!r}: not the key of "
                f"tls.certificate = {tls.certificate!r}"
            ) from None
        raise TlsConfigError(
            f"tls.certificate = {tls.certificate!r} / tls.private_key = "
            f"{tls.private_key!r}: cannot be loaded ({exc.reason or exc})"
        ) from None


def load_ca(context: ssl.SSLContext, path: str) -> None:
    """Trust the CA bundle at ``path``; raises TlsConfigError naming the file."""
    _read_pem("tls.ca_certificates", path, "CERTIFICATE")
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"tls.ca_certificates = {path!r}: cannot be loaded ({exc.reason or exc})"
        ) from None
