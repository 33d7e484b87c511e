"""The ``[[peers]]`` tables: DICOM peers the node accepts from and delivers to."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dicom_node.config.rules import check_value, closest


@dataclass(frozen=True)
class PeerSettings:
    """A DICOM peer: a DIMSE address (``ae_title``, ``host``, ``port``), a DICOMweb root
    (``dicomweb_url``), or both.  Results go by STOW-RS where ``dicomweb_url`` is set."""

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 104
    send_results: bool = False
    withdraw_superseded: bool = False  # send IOCM rejection notes for replaced results
    tls: bool = False  # send to this peer over DICOM TLS ([tls] keys)
    dicomweb_url: str = ""  # http(s)://host[:port]/path: its DICOMweb root (STOW-RS delivery)
    auth: str = "none"  # none, basic or bearer (HTTP authentication of the DICOMweb peer)
    credentials_file: str = ""  # basic: a "user:password" line; bearer: the token
    credentials_env: str = ""  # or the environment variable that holds the same text
    tls_verify: bool = True  # verify the DICOMweb peer's HTTPS certificate ([tls] CA bundle)

    @property
    def dimse(self) -> bool:
        """True when the peer has a DIMSE address (C-STORE, C-ECHO)."""
        return bool(self.ae_title and self.host)


def build_peers(items: Any, problems: list[str]) -> tuple[PeerSettings, ...]:
    if not isinstance(items, list):
        problems.append("peers must be an array of tables ([[peers]])")
        return ()
    peers: list[PeerSettings] = []
    required = ("name",)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(f"peers[{index}] must be a table")
            continue
        probe = PeerSettings(name="", ae_title="", host="")
        allowed = [f.name for f in dataclasses.fields(PeerSettings)]
        ok = True
        for key in item:  # named first: a misspelled key is why a required one looks missing
            if key not in allowed:
                problems.append(
                    f"peers[{index}].{key}: unknown key{closest(key, allowed)} "
                    f"(allowed: {', '.join(allowed)})"
                )
                ok = False
        missing = [k for k in required if k not in item]
        if missing:
            problems.append(f"peers[{index}]: missing {', '.join(missing)}")
            continue
        for key, value in item.items():
            if key not in allowed:
                continue
            elif not check_value(
                f"peers.{key}",
                value,
                getattr(probe, key),
                problems,
                display=f"peers[{index}].{key}",
            ):
                ok = False
        if ok and not _peer_address_ok(index, item, problems):
            ok = False
        if ok:
            peers.append(PeerSettings(**item))
    names = [p.name for p in peers]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"peers.name = {name!r}: must be unique")
    return tuple(peers)


def _peer_address_ok(index: int, item: dict[str, Any], problems: list[str]) -> bool:
    """A peer needs a DIMSE address (ae_title and host) or a DICOMweb root, and its HTTP
    credentials come from a file or the environment, never inline in the TOML."""
    found = len(problems)
    dimse = [k for k in ("ae_title", "host") if k in item]
    if len(dimse) == 1:
        missing = "host" if dimse == ["ae_title"] else "ae_title"
        problems.append(f"peers[{index}]: missing {missing} (a DIMSE address needs both)")
    elif not dimse and not item.get("dicomweb_url"):
        problems.append(f"peers[{index}]: missing ae_title and host, or dicomweb_url")
    auth = item.get("auth", "none")
    sources = [k for k in ("credentials_file", "credentials_env") if item.get(k)]
    if auth != "none" and len(sources) != 1:
        problems.append(
            f"peers[{index}]: auth = {auth!r} needs exactly one of credentials_file, "
            "credentials_env (never the secret itself in this file)"
        )
    if auth != "none" and not item.get("dicomweb_url"):
        problems.append(f"peers[{index}]: auth applies to dicomweb_url, which is not set")
    return len(problems) == found
