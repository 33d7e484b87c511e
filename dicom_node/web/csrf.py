"""CSRF protection: a synchronizer token per session, checked on every POST.

Each web session gets a random token when it is created; every form carries it in a hidden
``csrf_token`` field (and JSON calls made with a session cookie send it as ``X-CSRF-Token``).
The log-in form, which has no session yet, uses the same check against a short-lived cookie
(double submit).  Comparison is constant-time.
"""

from __future__ import annotations

import hmac
import secrets

from dicom_node.errors import CsrfError

FIELD = "csrf_token"
HEADER = "x-csrf-token"
LOGIN_COOKIE = "dn_login_csrf"


def new_token() -> str:
    """A fresh 256-bit token, URL-safe."""
    return secrets.token_urlsafe(32)


def require_token(expected: str | None, given: str | None) -> None:
    """Raise :class:`CsrfError` unless ``given`` is present and equals ``expected``."""
    if not expected or not given or not hmac.compare_digest(expected.encode(), given.encode()):
        raise CsrfError("the form's security token is missing or wrong: reload the page and "
                        "try again")
