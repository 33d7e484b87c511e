"""The operations sections of the settings: DICOM TLS, audit export, metrics, retention.

Kept apart from :mod:`dicom_node.config.settings` (which loads and validates every section) only to
keep modules small; the rules for these keys live in :mod:`dicom_node.config.rules` too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS (PS3.15 B.1, the BCP 195 non-downgrading profile): TLS 1.2 or newer only."""

    port: int = 0  # 0: no TLS listener; 2762 is DICOM's registered TLS port
    plaintext: bool = True  # keep the unencrypted listener on [node] port too
    certificate: str = ""  # PEM certificate chain of this node (server and client)
    private_key: str = ""  # PEM private key of that certificate
    ca_certificates: str = ""  # PEM CA bundle: verifies client certificates and peers
    require_client_certificate: bool = False  # senders must present a certificate from that CA
    min_version: str = "1.2"  # "1.2" or "1.3"


@dataclass(frozen=True)
class AuditSettings:
    """Where audit events go besides the ``audit_events`` table."""

    syslog: str = ""  # "": off; udp://host:514, tcp://host:601, unix:///dev/log
    syslog_app_name: str = "dicom-node"  # RFC 5424 APP-NAME
    forward_patient_ids: bool = False  # copies sent to the collector keep patient IDs too


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus endpoint and health checks (/metrics, /healthz, /readyz) of each process."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class RetentionSettings:
    """How long received images are kept; results, the ledger and the audit trail stay."""

    images_days: int = 0  # purge images this many days after delivery; 0: keep
    interval_minutes: int = 60  # how often the purge runs (worker role)
