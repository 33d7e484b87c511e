"""One log-in attempt: the form's pre-session, the throttle, then the password, off the loop.

The steps, each in a worker thread so the event loop (and every other request) never waits on
the database or on argon2:

1. the form's CSRF token must be the one stored for its pre-session cookie (403 otherwise);
2. an account or address that is waiting (web/throttle.py) is refused with its
   ``Retry-After``, audited as a ``user.login`` failure with reason ``throttled``, and the
   password is not checked;
3. the password is checked under the app's ``login_limiter`` (``[web] login_concurrency``
   checks at once, the rest wait without holding a thread), the throttle is asked again
   (a wait may have been set meanwhile), and the outcome is counted and audited.

Audit rows name the user only when the typed name is a user's (a name typed by mistake, a
patient's or a password, is not kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.audit.trail import FAILURE, record_audit
from dicom_node.db.models import User
from dicom_node.web import csrf, throttle
from dicom_node.web.auth import end_session, start_session
from dicom_node.web.context import WebContext
from dicom_node.web.users import password_matches, upgrade_hash, user_exists


@dataclass(frozen=True)
class LoginAttempt:
    """What the log-in form and its request brought."""

    username: str
    password: str
    address: str
    form_cookie: str | None  # the pre-session cookie
    form_token: str  # the form's hidden CSRF field
    old_session: str | None  # a session cookie this browser still sends


@dataclass(frozen=True)
class LoginOutcome:
    """A new session's cookie, or why there is none."""

    username: str | None = None
    session_cookie: str | None = None
    retry_after_seconds: int | None = None  # throttled: log-in refused for this long


async def attempt_login(
    context: WebContext, attempt: LoginAttempt, limiter: anyio.CapacityLimiter
) -> LoginOutcome:
    """Check the form, the throttle and the password (see the module docstring)."""
    refused = await anyio.to_thread.run_sync(_precheck, context, attempt)
    if refused is not None:
        return refused
    return await anyio.to_thread.run_sync(_check_password, context, attempt, limiter=limiter)


def _precheck(context: WebContext, attempt: LoginAttempt) -> LoginOutcome | None:
    """Steps 1 and 2: CsrfError for a forged form; the refusal when throttled; else None."""
    now = context.clock()
    with context.transaction() as session:
        csrf.require_login_token(session, attempt.form_cookie, attempt.form_token, now=now)
        return _refused(session, context, attempt)


def _check_password(context: WebContext, attempt: LoginAttempt) -> LoginOutcome:
    """Step 3, in a thread of the log-in limiter.  No transaction is open during argon2 (on
    SQLite every transaction holds the write lock that the SCP's stores also need)."""
    with context.transaction() as session:
        refused = _refused(session, context, attempt)
        if refused is not None:
            return refused
        user = session.scalar(select(User).where(User.username == attempt.username))
        password_hash = None if user is None or user.disabled else user.password_hash
    matches = password_matches(password_hash, attempt.password)
    now = context.clock()
    with context.transaction() as session:
        return _record(session, context, attempt, matches, now=now)


def _record(
    session: Session, context: WebContext, attempt: LoginAttempt, matches: bool, *, now: datetime
) -> LoginOutcome:
    """Count and audit the checked attempt; a new session when the password matched."""
    keys = throttle.login_keys(attempt.username, attempt.address)
    user = session.scalar(select(User).where(User.username == attempt.username))
    if not matches or user is None or user.disabled:  # disabled meanwhile: no session
        wait = throttle.record_failure(session, keys, now=now, web=context.settings.web)
        wait_detail: dict[str, Any] = {"wait_seconds": wait} if wait else {}
        record_audit(
            session,
            event_type="user.login",
            now=now,
            outcome=FAILURE,
            username=None if user is None else user.username,
            reason="wrong_password",
            **wait_detail,
        )
        return LoginOutcome()
    upgrade_hash(user, attempt.password)
    throttle.clear_account(session, keys)
    csrf.end_login_form(session, attempt.form_cookie)
    end_session(session, attempt.old_session)  # one session a browser
    cookie = start_session(session, user, now=now)
    record_audit(session, event_type="user.login", now=now, username=user.username)
    return LoginOutcome(user.username, cookie)


def _refused(session: Session, context: WebContext, attempt: LoginAttempt) -> LoginOutcome | None:
    """The throttled outcome (its first refusal audited), or None when log-in may go on."""
    now = context.clock()
    refusal = throttle.refusal(
        session, throttle.login_keys(attempt.username, attempt.address), now=now
    )
    if refusal is None:
        return None
    if refusal.first:
        record_audit(
            session,
            event_type="user.login",
            now=now,
            outcome=FAILURE,
            username=_known(session, attempt.username),
            reason="throttled",
            retry_after_seconds=refusal.retry_after_seconds,
        )
    return LoginOutcome(retry_after_seconds=refusal.retry_after_seconds)


def _known(session: Session, username: str) -> str | None:
    return username if user_exists(session, username) else None
