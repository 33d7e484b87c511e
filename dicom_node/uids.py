"""UID validation (PS3.5 9.1) and the node's UID minting; the only place UIDs are made.

A UID is used in a storage path only after :func:`is_valid_uid` accepts it, so an identifier
such as ``..`` or ``1.2/../3`` can never name a file outside the storage root.
"""

from __future__ import annotations

import hashlib
import re

# PS3.5 9.1: components of digits separated by dots, at most 64 characters in all.
# Leading zeros inside a component are not allowed by the standard but are common in real
# archives; they are harmless in a path, so they are tolerated.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a string of digits and dots, at most 64 characters."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and bool(_UID.match(value))


def derive_uid(org_uid_root: str, *parts: str) -> str:
    """A deterministic UID under ``org_uid_root`` from the given parts.

    The parts are hashed (SHA-256) and the digest, read as an integer, fills the remaining
    length, so the same inputs always give the same UID (PS3.5 B.2 allows any scheme that
    keeps UIDs unique under the organisation's root).
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    room = MAX_UID_LENGTH - len(org_uid_root) - 1
    number = str(int.from_bytes(digest, "big"))[:room].lstrip("0") or "0"
    return f"{org_uid_root}.{number}"
