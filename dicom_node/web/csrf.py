"""CSRF protection: a synchronizer token per session, checked on every POST.

Each web session gets a random token when it is created; every form carries it in a hidden
``csrf_token`` field (and JSON calls made with a session cookie send it as ``X-CSRF-Token``).
The log-in form, which has no session yet, is bound to a server-side pre-session: serving
``GET /login`` stores a row (the SHA-256 of a fresh cookie, and the form's token), and
``POST /login`` must bring that cookie and that token.  A cookie and field the client made up
match no row, so they are refused (403) however well they agree with each other.
Comparison is constant-time.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from dicom_node.clock import as_utc
from dicom_node.db.models import LoginPresession
from dicom_node.errors import CsrfError
from dicom_node.web.users import token_digest

FIELD = "csrf_token"
HEADER = "x-csrf-token"
LOGIN_COOKIE = "dn_login_csrf"
LOGIN_FORM_LIFETIME = timedelta(minutes=15)  # the pre-session cookie's max-age too


def new_token() -> str:
    """A fresh 256-bit token, URL-safe."""
    return secrets.token_urlsafe(32)


def require_token(expected: str | None, given: str | None) -> None:
    """Raise :class:`CsrfError` unless ``given`` is present and equals ``expected``."""
    if not expected or not given or not hmac.compare_digest(expected.encode(), given.encode()):
        raise CsrfError(
            "the form's security token is missing or wrong: reload the page and try again"
        )


def issue_login_form(session: Session, *, now: datetime) -> tuple[str, str]:
    """Store a pre-session for one log-in form; returns (cookie value, form token).

    Pre-sessions older than :data:`LOGIN_FORM_LIFETIME` are removed on the way, so the table
    holds at most what was served in that time.
    """
    session.execute(
        delete(LoginPresession).where(LoginPresession.created_at < now - LOGIN_FORM_LIFETIME)
    )
    cookie, token = new_token(), new_token()
    session.add(LoginPresession(id_sha256=token_digest(cookie), csrf_token=token, created_at=now))
    return cookie, token


def require_login_token(
    session: Session, cookie: str | None, given: str | None, *, now: datetime
) -> None:
    """Raise :class:`CsrfError` unless ``cookie`` names a live pre-session whose stored
    token is ``given``."""
    row = session.get(LoginPresession, token_digest(cookie)) if cookie else None
    live = row is not None and now - as_utc(row.created_at) <= LOGIN_FORM_LIFETIME
    require_token(row.csrf_token if live and row is not None else None, given)


def end_login_form(session: Session, cookie: str | None) -> None:
    """Forget the pre-session behind ``cookie`` (its log-in succeeded)."""
    if cookie:
        session.execute(
            delete(LoginPresession).where(LoginPresession.id_sha256 == token_digest(cookie))
        )
