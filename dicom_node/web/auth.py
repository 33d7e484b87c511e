"""Who is asking: browser sessions, API tokens, roles and scopes.

Browser sessions are server-side rows keyed by the SHA-256 of a random cookie value; the
cookie is HttpOnly, SameSite=Strict, and Secure when ``[web] secure_cookies`` is set.  A
session ends on log-out, after ``[web] session_idle_minutes`` without a request, and
``[web] session_absolute_hours`` after log-in, whichever comes first.  Machine clients send
``Authorization: Bearer <token>``.  The dependencies here raise our own errors, which
``app.py`` turns into a redirect to the log-in page, 401 or 403.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import delete
from sqlalchemy.orm import Session

from dicom_node.clock import as_utc
from dicom_node.config.settings import WebSettings
from dicom_node.db.models import User, UserRole, WebSession
from dicom_node.errors import AuthenticationRequiredError, PermissionDeniedError
from dicom_node.web import csrf
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.users import account_for_token, token_digest

SESSION_COOKIE = "dn_session"
AUTO_REFRESH = "auto"  # the query parameter the worklist's self-refresh carries
TOUCH_EVERY = timedelta(seconds=30)  # last_seen_at is written at most this often
BEARER = HTTPBearer(auto_error=False, description="An API token from `dicom-node users token NAME`")


@dataclass(frozen=True)
class Principal:
    """The user (or token) behind a request, and how it signed in."""

    username: str
    role: str  # radiologist, admin, or api (a token)
    scope: str  # read, write, or store (STOW-RS only)
    via: str  # session or token
    csrf_token: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN.value


def start_session(session: Session, user: User, *, now: datetime) -> str:
    """A new session for ``user`` (a new id at every log-in); returns the cookie value."""
    cookie = secrets.token_urlsafe(32)
    session.add(
        WebSession(
            id_sha256=token_digest(cookie),
            user_id=user.id,
            csrf_token=csrf.new_token(),
            created_at=now,
            last_seen_at=now,
        )
    )
    return cookie


def end_session(session: Session, cookie: str | None) -> None:
    """Forget the session behind ``cookie`` (log-out)."""
    if cookie:
        session.execute(delete(WebSession).where(WebSession.id_sha256 == token_digest(cookie)))


def resume_session(
    session: Session, cookie: str, *, now: datetime, web: WebSettings, touch: bool = True
) -> Principal | None:
    """The principal of a live session, or None (unknown, expired, or user disabled).

    ``touch=False`` (the worklist's own auto-refresh) leaves ``last_seen_at`` alone, so an
    open but unattended worklist still reaches the idle timeout.
    """
    row = session.get(WebSession, token_digest(cookie))
    if row is None:
        return None
    user = session.get(User, row.user_id)
    idle = now - as_utc(row.last_seen_at) > timedelta(minutes=web.session_idle_minutes)
    old = now - as_utc(row.created_at) > timedelta(hours=web.session_absolute_hours)
    if user is None or user.disabled or idle or old:
        session.delete(row)
        return None
    if touch and now - as_utc(row.last_seen_at) > TOUCH_EVERY:
        row.last_seen_at = now
    return Principal(user.username, user.role, "write", "session", row.csrf_token)


def is_auto_refresh(request: Request) -> bool:
    """True for the worklist's self-refresh (``?auto=1``), which is not user activity."""
    return request.query_params.get(AUTO_REFRESH) == "1"


def session_principal(request: Request, context: WebContext) -> Principal | None:
    """The request's session principal, if its cookie names a live session."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    with context.transaction() as session:
        return resume_session(
            session,
            cookie,
            now=context.clock(),
            web=context.settings.web,
            touch=not is_auto_refresh(request),
        )


def page_principal(request: Request, context: WebContext = Depends(get_context)) -> Principal:
    """For browser pages: a session is required (else the app redirects to log in)."""
    principal = session_principal(request, context)
    if principal is None:
        raise AuthenticationRequiredError("log in to see this page")
    return principal


def admin_principal(principal: Principal = Depends(page_principal)) -> Principal:
    """For admin pages and actions: an admin's session (a radiologist gets 403)."""
    if not principal.is_admin:
        raise PermissionDeniedError("this page is for administrators")
    return principal


def api_principal(
    request: Request,
    context: WebContext = Depends(get_context),
    credentials: HTTPAuthorizationCredentials | None = Depends(BEARER),
) -> Principal:
    """For the JSON API: a bearer token (not one of the store scope), or a browser session."""
    if credentials is not None:
        token = token_principal(context, credentials)
        if token.scope == "store":
            raise PermissionDeniedError("this token may only post instances (STOW-RS)")
        return token
    principal = session_principal(request, context)
    if principal is None:
        raise AuthenticationRequiredError("send an API token: Authorization: Bearer <token>")
    return principal


def store_principal(
    context: WebContext = Depends(get_context),
    credentials: HTTPAuthorizationCredentials | None = Depends(BEARER),
) -> Principal:
    """For STOW-RS: a bearer token with the store scope (a browser session posts nothing)."""
    if credentials is None:
        raise AuthenticationRequiredError("send an API token: Authorization: Bearer <token>")
    principal = token_principal(context, credentials)
    if principal.scope != "store":
        raise PermissionDeniedError(
            "this token may not store instances (create one with --scope store)"
        )
    return principal


def token_principal(context: WebContext, credentials: HTTPAuthorizationCredentials) -> Principal:
    """The principal of a bearer token (AuthenticationRequiredError: unknown or revoked)."""
    with context.transaction() as session:
        account = account_for_token(session, credentials.credentials, now=context.clock())
    if account is None:
        raise AuthenticationRequiredError("the API token is unknown or revoked")
    return Principal(account.username, account.role, account.scope, "token")


def api_writer(request: Request, principal: Principal = Depends(api_principal)) -> Principal:
    """For API changes: a token with the write scope, or a session with its CSRF header."""
    if principal.via == "token" and principal.scope != "write":
        raise PermissionDeniedError("this token is read-only (create one with --scope write)")
    if principal.via == "session":
        csrf.require_token(principal.csrf_token, request.headers.get(csrf.HEADER))
    return principal


def signed_in(request: Request) -> bool:
    """Whether ``request`` carries a valid API token or a live session: the check the body
    limit middleware makes before a route reads a body (the route's own dependency then
    decides role, scope and CSRF)."""
    context: WebContext = request.app.state.context
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        with context.transaction() as session:
            account = account_for_token(session, credentials.strip(), now=context.clock())
        return account is not None
    return session_principal(request, context) is not None


def set_session_cookie(response: Response, cookie: str, web: WebSettings) -> None:
    """Attach the session cookie with its protective flags (HttpOnly, SameSite=Strict, Secure)."""
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        httponly=True,
        samesite="strict",
        secure=web.secure_cookies,
        path="/",
        max_age=web.session_absolute_hours * 3600,
    )
