"""Log-in throttling: wrong passwords per account and per client address, with backoff.

Each wrong password adds one to two counters in ``login_failures``: the account's (keyed by
the SHA-256 of the typed name, so a patient's name typed by mistake is never stored) and the
client address's.  The first ``[web] login_free_failures`` cost nothing; each one after sets a
wait of ``login_backoff_seconds``, doubling per further failure up to
``login_max_backoff_seconds``, during which log-in from that account or address is refused
(HTTP 429) without the password being checked, so a refused attempt costs no argon2 work and
is not counted.  A successful log-in clears its account's counter; a counter quiet for
:func:`forget_after` is forgotten (and its row removed).

The counters live in the database, not in the process: they survive restarts and hold for
every web process of the node.  Rows are locked while counted (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises writers), so parallel attempts cannot
slip past the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, tuple_
from sqlalchemy.orm import Session

from dicom_node.clock import as_utc
from dicom_node.config.settings import WebSettings
from dicom_node.db.models import LoginFailure
from dicom_node.db.upsert import insert_ignore
from dicom_node.web.users import token_digest

ACCOUNT = "account"
ADDRESS = "address"
QUIET_FORGET = timedelta(hours=1)  # a counter without failures for this long starts again


@dataclass(frozen=True)
class LoginKeys:
    """The two counters an attempt belongs to: its account and its client address."""

    account: str  # SHA-256 of the typed user name, hex
    address: str  # the client's IP address as the server saw it

    def pairs(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return (ACCOUNT, self.account), (ADDRESS, self.address)


@dataclass(frozen=True)
class Refusal:
    """Log-in is refused for ``retry_after_seconds``; ``first`` for the first refusal since
    the wait was set (that one is audited, the rest are counted in the row)."""

    retry_after_seconds: int
    first: bool


def login_keys(username: str, address: str) -> LoginKeys:
    """The counters of a log-in with ``username`` from ``address``."""
    return LoginKeys(token_digest(username), address[:64])


def backoff_seconds(failures: int, web: WebSettings) -> float:
    """The wait after ``failures`` wrong passwords in a row: 0 while they are free."""
    extra = failures - web.login_free_failures
    if extra <= 0:
        return 0.0
    return min(web.login_backoff_seconds * 2.0 ** min(extra - 1, 64), web.login_max_backoff_seconds)


def forget_after(web: WebSettings) -> timedelta:
    """How long a counter is kept without failures (never shorter than its longest wait)."""
    return max(QUIET_FORGET, 2 * timedelta(seconds=web.login_max_backoff_seconds))


def refusal(session: Session, keys: LoginKeys, *, now: datetime) -> Refusal | None:
    """The refusal for an attempt now, or None when neither counter is waiting."""
    rows = session.scalars(
        select(LoginFailure).where(
            tuple_(LoginFailure.kind, LoginFailure.subject).in_(keys.pairs())
        )
    ).all()
    locked = [
        row for row in rows if row.locked_until is not None and as_utc(row.locked_until) > now
    ]
    if not locked:
        return None
    first = any(row.refusals == 0 for row in locked)
    for row in locked:
        row.refusals += 1
    until = max(as_utc(row.locked_until) for row in locked)  # type: ignore[arg-type]
    return Refusal(max(1, math.ceil((until - now).total_seconds())), first)


def record_failure(session: Session, keys: LoginKeys, *, now: datetime, web: WebSettings) -> float:
    """Count one wrong password on both counters; returns the wait it set (0: none yet)."""
    session.execute(
        delete(LoginFailure).where(LoginFailure.last_failure_at < now - forget_after(web))
    )
    longest = 0.0
    for kind, subject in keys.pairs():
        row = _locked_row(session, kind, subject, now=now)
        if now - as_utc(row.last_failure_at) > forget_after(web):
            row.failures = 0
        row.failures += 1
        row.last_failure_at = now
        wait = backoff_seconds(row.failures, web)
        if wait:
            row.locked_until = now + timedelta(seconds=wait)
            row.refusals = 0
        longest = max(longest, wait)
    return longest


def clear_account(session: Session, keys: LoginKeys) -> None:
    """Forget the account's wrong passwords (after a successful log-in).  The address's
    counter stays: one good password must not reset a sweep across other names."""
    session.execute(
        delete(LoginFailure).where(
            LoginFailure.kind == ACCOUNT, LoginFailure.subject == keys.account
        )
    )


def _locked_row(session: Session, kind: str, subject: str, *, now: datetime) -> LoginFailure:
    """The counter row, created when missing, locked for this transaction."""
    insert_ignore(
        session,
        LoginFailure,
        {
            "kind": kind,
            "subject": subject,
            "failures": 0,
            "last_failure_at": now,
            "locked_until": None,
            "refusals": 0,
        },
    )
    return session.scalars(
        select(LoginFailure)
        .where(LoginFailure.kind == kind, LoginFailure.subject == subject)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()
