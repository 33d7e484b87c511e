"""What each configuration key allows: one check and one phrase per ``section.key``.

``dicom_node.config.settings`` applies these at load; a key not listed here only needs a value
of its default's type.  The phrase is what a bad value's error line says is allowed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

from dicom_node.uids import is_valid_uid

# PS3.5 6.2: AE titles are at most 16 characters of the Default Character Repertoire,
# no backslash and no control characters; leading/trailing spaces are not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

Check = Callable[[Any], bool]


def _port(v: Any) -> bool:
    return isinstance(v, int) and 1 <= v <= 65535


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _non_negative_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _syslog_target(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    if re.fullmatch(r"unix:///.+", v):
        return True
    match = re.fullmatch(r"(udp|tcp)://[^/:]+:(\d{1,5})", v)
    return match is not None and 1 <= int(match.group(2)) <= 65535


# (check, what is allowed) per "section.key"; keys not listed only need the right type.
RULES: dict[str, tuple[Check, str]] = {
    "node.ae_title": (
        lambda v: isinstance(v, str) and bool(_AE_TITLE.match(v)) and v.strip() != "",
        "1-16 printable ASCII characters, no backslash",
    ),
    "node.host": (_text, "an IP address or host name to listen on"),
    "node.port": (_port, "an integer 1-65535"),
    "node.org_uid_root": (
        lambda v: isinstance(v, str) and is_valid_uid(v) and len(v) <= 32,
        "a UID root of digits and dots, at most 32 characters",
    ),
    "storage.root": (_text, "a directory path"),
    "storage.min_free_mb": (_non_negative_int, "an integer >= 0 (megabytes)"),
    "database.url": (
        lambda v: (
            v == ""
            or (isinstance(v, str) and v.split(":", 1)[0] in ("sqlite", "postgresql+psycopg"))
        ),
        "empty (embedded SQLite) or a sqlite:/// or postgresql+psycopg:// URL",
    ),
    "database.busy_timeout_ms": (_non_negative_int, "an integer >= 0 (milliseconds)"),
    "scp.max_associations": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "scp.network_timeout": (_positive, "a number of seconds > 0"),
    "scp.acse_timeout": (_positive, "a number of seconds > 0"),
    "scp.dimse_timeout": (_positive, "a number of seconds > 0"),
    "scp.max_pdu_size": (
        lambda v: isinstance(v, int) and (v == 0 or 4096 <= v <= 2**32 - 1),
        "0 (unlimited) or an integer 4096-4294967295 (bytes)",
    ),
    "scp.other_sop_classes": (lambda v: v in ("discard", "reject"), "'discard' or 'reject'"),
    "scheduler.study_quiet_seconds": (_positive, "a number of seconds > 0"),
    "scheduler.tick_seconds": (_positive, "a number of seconds > 0"),
    "scheduler.lease_seconds": (_positive, "a number of seconds > 0"),
    "scheduler.max_attempts": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "model.name": (_text, "a model name from `dicom-node models list`"),
    "model.device": (
        lambda v: (
            isinstance(v, str)
            and (v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None)
        ),
        "'auto', 'cpu', 'cuda' or 'cuda:N'",
    ),
    "model.batch_size": (lambda v: isinstance(v, int) and 1 <= v <= 1024, "an integer 1-1024"),
    "model.threads": (_non_negative_int, "an integer >= 0 (0: the runtime's default)"),
    "model.runtime": (
        lambda v: v in ("auto", "torch", "onnxruntime"),
        "'auto', 'torch' or 'onnxruntime'",
    ),
    "analysis.min_patient_age": (_non_negative_int, "an integer >= 0 (years)"),
    "analysis.max_megapixels": (_positive, "a number of megapixels > 0"),
    "analysis.box_threshold": (lambda v: _positive(v) and v < 1, "a number between 0 and 1"),
    "analysis.backoff_seconds": (_positive, "a number of seconds > 0"),
    "outputs.sc_mode": (
        lambda v: v in ("composite", "per_finding"),
        "'composite' or 'per_finding'",
    ),
    "outputs.sc_max_size": (
        lambda v: isinstance(v, int) and 256 <= v <= 8192,
        "an integer 256-8192 (pixels)",
    ),
    "delivery.backoff_seconds": (_positive, "a number of seconds > 0"),
    "delivery.max_backoff_seconds": (_positive, "a number of seconds > 0"),
    "delivery.give_up_after_seconds": (_positive, "a number of seconds > 0"),
    "delivery.batch_size": (lambda v: isinstance(v, int) and 1 <= v <= 10000, "an integer 1-10000"),
    "delivery.timeout_seconds": (_positive, "a number of seconds > 0"),
    "web.host": (_text, "an IP address or host name to listen on"),
    "web.port": (_port, "an integer 1-65535"),
    "web.session_idle_minutes": (
        lambda v: isinstance(v, int) and 1 <= v <= 1440,
        "an integer 1-1440 (minutes)",
    ),
    "web.session_absolute_hours": (
        lambda v: isinstance(v, int) and 1 <= v <= 168,
        "an integer 1-168 (hours)",
    ),
    "web.critical_findings": (
        lambda v: all(isinstance(x, str) and x.strip() for x in v),
        'a list of finding labels, e.g. ["Pneumothorax"]',
    ),
    "web.refresh_seconds": (
        lambda v: isinstance(v, int) and (v == 0 or 5 <= v <= 3600),
        "0 (off) or an integer 5-3600 (seconds)",
    ),
    "logging.level": (
        lambda v: v in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "DEBUG, INFO, WARNING or ERROR",
    ),
    "logging.format": (lambda v: v in ("json", "console"), "'json' or 'console'"),
    "scp.max_backlog": (_non_negative_int, "an integer >= 0 (jobs; 0: never refuse)"),
    "scp.max_pending_connections": (
        lambda v: isinstance(v, int) and v >= 1,
        "an integer >= 1 (connections)",
    ),
    "scp.max_inflated_mb": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1 (megabytes)"),
    "scheduler.storage_full_retry_seconds": (_positive, "a number of seconds > 0"),
    "web.login_free_failures": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "web.login_backoff_seconds": (_positive, "a number of seconds > 0"),
    "web.login_max_backoff_seconds": (_positive, "a number of seconds > 0"),
    "web.login_concurrency": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "web.max_request_kb": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1 (kilobytes)"),
    "tls.port": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535,
        "0 (no TLS listener) or an integer 1-65535",
    ),
    "tls.min_version": (
        lambda v: v in ("1.2", "1.3"),
        "'1.2' or '1.3' (older TLS is never allowed)",
    ),
    "audit.syslog": (
        lambda v: v == "" or _syslog_target(v),
        "empty (off), udp://HOST:PORT, tcp://HOST:PORT (port 1-65535) or unix:///PATH",
    ),
    "audit.syslog_app_name": (
        lambda v: isinstance(v, str) and re.fullmatch(r"[!-~]{1,48}", v) is not None,
        "1-48 printable ASCII characters, no spaces (RFC 5424 APP-NAME)",
    ),
    "metrics.host": (_text, "an IP address or host name to listen on"),
    "metrics.port": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535,
        "an integer 1-65535 (0: any free port)",
    ),
    "retention.images_days": (_non_negative_int, "an integer >= 0 (days; 0: keep images)"),
    "retention.interval_minutes": (
        lambda v: isinstance(v, int) and 1 <= v <= 10080,
        "an integer 1-10080 (minutes)",
    ),
    "peers.name": (_text, "a non-empty name"),
    "peers.ae_title": (
        lambda v: isinstance(v, str) and bool(_AE_TITLE.match(v)) and v.strip() != "",
        "1-16 printable ASCII characters, no backslash",
    ),
    "peers.host": (_text, "an IP address or host name"),
    "peers.port": (_port, "an integer 1-65535"),
    "peers.dicomweb_url": (
        lambda v: (
            isinstance(v, str) and re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", v) is not None
        ),
        "an http:// or https:// URL of the peer's DICOMweb root, no query",
    ),
    "peers.auth": (lambda v: v in ("none", "basic", "bearer"), "'none', 'basic' or 'bearer'"),
    "peers.credentials_file": (_text, "the path of a file holding the credentials"),
    "peers.credentials_env": (
        lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) is not None,
        "the name of an environment variable",
    ),
    "web.max_stow_mb": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1 (megabytes)"),
    "web.viewer_url": (
        lambda v: (
            isinstance(v, str)
            and (v == "" or (re.match(r"https?://", v) is not None and "{study_instance_uid}" in v))
        ),
        "empty, or an http(s):// URL containing {study_instance_uid}",
    ),
}


def check_value(key: str, value: Any, default: Any, problems: list[str], display: str = "") -> bool:
    check, allowed = RULES.get(key, (lambda v: True, ""))
    type_ok = _same_type(value, default)
    if not type_ok or not check(value):
        what = allowed or f"a {type(default).__name__}"
        problems.append(f"{display or key} = {value!r}: must be {what}")
        return False
    return True


def _same_type(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def closest(key: str, allowed: list[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss of an allowed key, else nothing."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
