"""``dicom-node config check``: validate the configuration and print the effective settings.

Loading the settings already checked every value (``ConfigError``, exit 2); this also builds
the TLS listener's and the sender's contexts, so an unusable ``[tls]`` file is named now
(``TlsConfigError``, exit 2), not at the first association.  The database password is never
printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.cli.exits import ExitStatus
from dicom_node.config.settings import PeerSettings, Settings
from dicom_node.scu.tls import check_peer_tls


def run_config_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Check the TLS files and print the settings that matter to an administrator."""
    if settings.tls.port:
        from dicom_node.scp.tls import server_context  # pynetdicom: only with TLS

        server_context(settings.tls)
    check_peer_tls(settings)
    print("configuration is valid")
    print(f"  node: {settings.node.ae_title} on {settings.node.host}:{settings.node.port}")
    print(f"  storage: {Path(settings.storage.root)} (min free {settings.storage.min_free_mb} MB)")
    print(f"  database: {redact_url(settings.database_url)}")
    if settings.tls.port:
        print(
            f"  DICOM TLS: port {settings.tls.port}, TLS {settings.tls.min_version} or newer"
            f"{'' if settings.tls.plaintext else ' (plaintext listener off)'}"
        )
    for peer in settings.peers:
        print(f"  peer {peer.name}: {describe_peer(peer)}")
    return ExitStatus.OK


def describe_peer(peer: PeerSettings) -> str:
    """Where a peer is and how results reach it, in one line (no secrets)."""
    where = []
    if peer.dimse:
        where.append(f"{peer.ae_title} at {peer.host}:{peer.port}{' over TLS' if peer.tls else ''}")
    if peer.dicomweb_url:
        where.append(f"DICOMweb {peer.dicomweb_url} (auth {peer.auth})")
    results = ""
    if peer.send_results:
        results = " (receives results by " + ("STOW-RS)" if peer.dicomweb_url else "C-STORE)")
    return " and ".join(where) + results


def redact_url(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
