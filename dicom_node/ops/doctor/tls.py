"""The doctor's DICOM TLS checks: the certificate, private key and CA files of ``[tls]``.

Run when the node uses TLS (``[tls] port`` is not 0, or a peer has ``tls = true``).  Each file
must exist, be readable and parse; the key must match the certificate and must not be
readable by every user; the certificate must not be expired (a warning within 30 days).
Parsing uses Python's ``ssl`` (a throwaway ``SSLContext``), the expiry date the ``openssl``
command, since ``ssl`` has no public way to decode a certificate file.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dicom_node.config.settings import Settings
from dicom_node.errors import TlsConfigError
from dicom_node.ops.doctor.result import FAIL, OK, WARN, CheckResult
from dicom_node.scp.tls import server_context
from dicom_node.scu.tls import peer_tls_args

EXPIRY_WARNING = timedelta(days=30)


class _PassphraseNeeded(Exception):
    """The private key is encrypted; raised from the password callback instead of a prompt."""


def _no_passphrase() -> bytes:
    raise _PassphraseNeeded


def tls_in_use(settings: Settings) -> bool:
    return settings.tls.port != 0 or any(peer.tls for peer in settings.peers)


def check_tls(settings: Settings, *, now: datetime) -> list[CheckResult]:
    """The three TLS files, or one ok row saying TLS is not used."""
    if not tls_in_use(settings):
        return [CheckResult("tls", OK, "not used ([tls] port = 0 and no peer has tls = true)")]
    certificate = check_certificate(settings.tls.certificate, now=now)
    results = [certificate]
    results.append(
        check_private_key(
            settings.tls.private_key,
            settings.tls.certificate,
            certificate_ok=certificate.status != FAIL,
        )
    )
    results.append(check_ca_certificates(settings))
    if all(result.status != FAIL for result in results):
        results.append(check_tls_contexts(settings))
    return results


def check_tls_contexts(settings: Settings) -> CheckResult:
    """The node's own TLS code accepts the files: the contexts ``serve`` and sending build."""
    try:
        if settings.tls.port:
            server_context(settings.tls)
        for peer in settings.peers:
            peer_tls_args(settings.tls, peer)
    except TlsConfigError as exc:
        return CheckResult("tls contexts", FAIL, str(exc), "fix the [tls] file named")
    return CheckResult("tls contexts", OK, "the listener's and the sender's TLS contexts load")


def _unreadable(label: str, key: str, value: str) -> CheckResult | None:
    """A fail row when the file named by ``[tls] key`` is not set, missing or unreadable."""
    if not value:
        return CheckResult(
            label, FAIL, f"[tls] {key} is empty but TLS is used", f"set [tls] {key} to a PEM file"
        )
    path = Path(value)
    try:
        path.read_bytes()
    except FileNotFoundError:
        return CheckResult(
            label, FAIL, f"{path} does not exist", f"install the file, or fix [tls] {key}"
        )
    except OSError as exc:
        return CheckResult(
            label,
            FAIL,
            f"{path} cannot be read ({exc.strerror})",
            f"chgrp dicom-node {path}; chmod 640 {path}",
        )
    return None


def check_certificate(value: str, *, now: datetime) -> CheckResult:
    """This node's certificate: present, PEM, and not expired (warn within 30 days)."""
    label = "tls certificate"
    problem = _unreadable(label, "certificate", value)
    if problem:
        return problem
    path = Path(value)
    try:
        ssl.create_default_context(cafile=str(path))  # parses every PEM certificate in the file
    except ssl.SSLError as exc:
        return CheckResult(
            label,
            FAIL,
            f"{path} is not a PEM certificate ({exc.reason or exc})",
            "install the PEM (-----BEGIN CERTIFICATE-----) certificate chain",
        )
    not_after = certificate_not_after(path)
    if not_after is None:
        return CheckResult(
            label,
            WARN,
            f"{path} parses; expiry not checked (no openssl command)",
            "apt-get install openssl",
        )
    renew = f"renew the certificate and install it at {path}; then restart the node"
    shown = not_after.strftime("%Y-%m-%d %H:%M UTC")
    if not_after <= now:
        return CheckResult(label, FAIL, f"{path} expired on {shown}", renew)
    if not_after - now <= EXPIRY_WARNING:
        return CheckResult(
            label, WARN, f"{path} expires on {shown} (in {(not_after - now).days} days)", renew
        )
    return CheckResult(label, OK, f"{path} valid until {shown}")


def certificate_not_after(path: Path) -> datetime | None:
    """The first certificate's notAfter (RFC 5280 4.1.2.5), via ``openssl x509 -enddate``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    run = subprocess.run(
        [openssl, "x509", "-in", str(path), "-noout", "-enddate"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    text = run.stdout.strip()
    if run.returncode != 0 or not text.startswith("notAfter="):
        return None
    seconds = ssl.cert_time_to_seconds(text.removeprefix("notAfter="))
    return datetime.fromtimestamp(seconds, UTC)


def check_private_key(value: str, certificate: str, *, certificate_ok: bool) -> CheckResult:
    """The key: readable, not world-readable, no passphrase, and the certificate's own."""
    label = "tls private key"
    problem = _unreadable(label, "private_key", value)
    if problem:
        return problem
    path = Path(value)
    mode = path.stat().st_mode & 0o777
    if mode & 0o007:
        return CheckResult(
            label,
            FAIL,
            f"{path} is readable by every user (mode {mode:04o})",
            f"chmod 640 {path}; chgrp dicom-node {path}",
        )
    if not certificate_ok:
        return CheckResult(
            label,
            WARN,
            f"{path} not checked against the certificate (the certificate has a problem)",
            "fix the certificate first",
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certificate, str(path), password=_no_passphrase)
    except _PassphraseNeeded:
        return CheckResult(
            label,
            FAIL,
            f"{path} is encrypted: the node cannot enter a passphrase",
            f"store it unencrypted (openssl pkey -in {path} -out NEW), mode 640",
        )
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            return CheckResult(
                label,
                FAIL,
                f"{path} does not belong to the certificate {certificate}",
                "install the key the certificate was issued for",
            )
        return CheckResult(
            label,
            FAIL,
            f"{path} is not a usable PEM private key ({exc.reason or exc})",
            "install the PEM private key",
        )
    return CheckResult(label, OK, f"{path} matches the certificate (mode {mode:04o})")


def check_ca_certificates(settings: Settings) -> CheckResult:
    """The CA bundle that verifies senders' certificates and peers' (else the system store)."""
    label = "tls CA certificates"
    if not settings.tls.ca_certificates:
        fix = "set [tls] ca_certificates to the PEM bundle of the CA that signs them"
        if settings.tls.require_client_certificate:
            return CheckResult(
                label,
                FAIL,
                "[tls] ca_certificates is empty, but require_client_certificate = true needs it",
                fix,
            )
        if any(peer.tls for peer in settings.peers):
            return CheckResult(
                label,
                WARN,
                "[tls] ca_certificates is empty: TLS peers are "
                "verified against the system's CA store",
                fix,
            )
        return CheckResult(label, OK, "not set: senders' certificates are not checked")
    problem = _unreadable(label, "ca_certificates", settings.tls.ca_certificates)
    if problem:
        return problem
    path = Path(settings.tls.ca_certificates)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        return CheckResult(
            label,
            FAIL,
            f"{path} holds no usable PEM certificate ({exc.reason or exc})",
            "install the CA's PEM certificate(s)",
        )
    count = context.cert_store_stats()["x509_ca"] + context.cert_store_stats()["x509"]
    return CheckResult(label, OK, f"{path}: {count} certificate(s)")
