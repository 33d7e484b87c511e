"""Doctor checks of the peers: C-ECHO each DIMSE peer, a QIDO-RS search of each DICOMweb one."""

from __future__ import annotations

from datetime import datetime

from dicom_node.config.settings import PeerSettings, Settings
from dicom_node.ops.actions import EchoResult, echo_peer
from dicom_node.ops.doctor.result import FAIL, OK, WARN, CheckResult

PEER_ECHO_TIMEOUT_SECONDS = 5.0


def check_peers(
    settings: Settings, *, now: datetime, timeout: float = PEER_ECHO_TIMEOUT_SECONDS
) -> list[CheckResult]:
    """C-ECHO every peer; a peer that only sends to us (no results) fails as a warning only."""
    if not settings.peers:
        return [
            CheckResult(
                "peers",
                WARN,
                "no [[peers]]: no sender is allowed in",
                "add a [[peers]] entry for each PACS or modality",
            )
        ]
    return [_check_peer(settings, peer, now=now, timeout=timeout) for peer in settings.peers]


def _check_peer(
    settings: Settings, peer: PeerSettings, *, now: datetime, timeout: float
) -> CheckResult:
    where = f"{peer.ae_title} at {peer.host}:{peer.port}{' (TLS)' if peer.tls else ''}"
    result = echo_peer(settings, peer, now=now, timeout=timeout)
    if peer.dicomweb_url:
        return _dicomweb_result(peer, result)
    if result.outcome == "success":
        return CheckResult(f"peer {peer.name}", OK, f"C-ECHO to {where}: success")
    if "TLS" in result.detail:
        fix = (
            f"check that {peer.port} is the peer's TLS port, that [tls] ca_certificates "
            "signs its certificate, and the tls rows below"
        )
    elif "rejected" in result.detail:
        fix = (
            f"register this node at the peer: AE title {settings.node.ae_title} and this "
            "machine's address"
        )
    elif result.status_code is not None:
        fix = "the peer answered but refused the echo: ask its administrator"
    else:
        fix = (
            f"check that the peer runs and listens on {peer.host}:{peer.port}, the "
            f"[[peers]] {peer.name} host and port, and the firewall"
        )
    status = FAIL if peer.send_results else WARN
    note = "" if peer.send_results else " (it only sends to us; results are not sent to it)"
    return CheckResult(
        f"peer {peer.name}", status, f"C-ECHO to {where}: {result.detail}{note}", fix
    )


def _dicomweb_result(peer: PeerSettings, result: EchoResult) -> CheckResult:
    """The doctor's row of a DICOMweb peer, from its QIDO-RS check."""
    name, where = f"peer {peer.name}", f"DICOMweb {peer.dicomweb_url}"
    if result.outcome == "success":
        return CheckResult(name, OK, f"{where}: {result.detail}")
    if "401" in result.detail or "403" in result.detail or "credentials" in result.detail:
        fix = f"check [[peers]] {peer.name} auth and its credentials_file or credentials_env"
    else:
        fix = f"check that {peer.dicomweb_url} is the peer's DICOMweb root and that it is up"
    status = FAIL if peer.send_results else WARN
    return CheckResult(name, status, f"{where}: {result.detail}", fix)
