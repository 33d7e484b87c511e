"""Local web users and API tokens: creation, password checks, token look-up.

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's second recommended
setting); the plain password is never stored or logged.  API tokens are 256-bit random strings
shown once at creation; only their SHA-256 is stored (a high-entropy secret needs no slow hash),
so a stolen database does not give working tokens.  Tokens are read-only unless created with
the ``write`` scope; a ``store`` token may only post instances (STOW-RS) and reads nothing.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from argon2 import PasswordHasher, low_level
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session

from dicom_node.audit.trail import record_audit
from dicom_node.db.models import ApiToken, User, UserRole, WebSession
from dicom_node.errors import UserError

ROLES = tuple(role.value for role in UserRole)
SCOPES = ("read", "write", "store")  # store: STOW-RS only, neither reads nor writes the API
MIN_PASSWORD_LENGTH = 10
TOKEN_PREFIX = "dnt_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class Account:
    """A signed-in person or machine client, as the web layer sees it."""

    username: str  # a user name, or "token:NAME" for an API token
    role: str  # radiologist or admin (tokens: "api")
    scope: str = "write"  # read (nothing to change), write (feedback), store (STOW-RS only)


def _hasher() -> PasswordHasher:
    return PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """The hash verified against when the name is unknown, so that costs what a real check
    costs (one verification).  Made on the first check (importing this module does no argon2
    work), then reused: an immutable string with the hasher's current parameters."""
    hasher = _hasher()
    return low_level.hash_secret(
        secrets.token_bytes(16),
        secrets.token_bytes(16),
        time_cost=hasher.time_cost,
        memory_cost=hasher.memory_cost,
        parallelism=hasher.parallelism,
        hash_len=hasher.hash_len,
        type=hasher.type,
    ).decode("ascii")


def add_user(
    session: Session,
    *,
    username: str,
    password: str,
    role: str,
    now: datetime,
    created_by: str | None = None,
) -> None:
    """Create a user with an argon2id hash of ``password``.

    Raises
    ------
    UserError
        For a bad name, an unknown role, a short password, or a name already taken.
    """
    if not _NAME.match(username):
        raise UserError(f"user name {username!r} is not allowed: 1-64 letters, digits, . _ @ -")
    if role not in ROLES:
        raise UserError(f"role {role!r} is unknown: use {' or '.join(ROLES)}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise UserError(f"user {username!r} already exists")
    session.add(
        User(
            username=username,
            password_hash=_hasher().hash(password),
            role=role,
            disabled=False,
            created_at=now,
        )
    )
    record_audit(
        session,
        event_type="user.created",
        now=now,
        username=created_by,
        subject=username,
        role=role,
    )


def list_users(session: Session) -> list[tuple[str, str, bool]]:
    """(name, role, disabled) of every user, by name."""
    return [
        (u.username, u.role, u.disabled)
        for u in session.scalars(select(User).order_by(User.username))
    ]


def authenticate(session: Session, *, username: str, password: str) -> User | None:
    """The enabled user whose password this is, else None.

    An unknown name still costs one hash verification, so timing does not tell which names
    exist.  A hash made with older parameters is upgraded on the way.  The web log-in does
    the same in two transactions (web/login.py), so no transaction is open during argon2.
    """
    user = session.scalar(select(User).where(User.username == username))
    password_hash = None if user is None or user.disabled else user.password_hash
    matches = password_matches(password_hash, password)  # an unknown name costs the same
    if user is None or not matches:
        return None
    upgrade_hash(user, password)
    return user


def password_matches(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` is the one behind ``password_hash`` (one argon2 verification).

    ``None`` (no such user, or a disabled one) costs one verification all the same, against a
    dummy hash made with the same parameters, and is never a match.
    """
    dummy = _dummy_hash()  # made before either branch: the first check costs the same
    hasher = _hasher()
    if password_hash is None:
        _burn_time(hasher, dummy)
        return False
    try:
        return bool(hasher.verify(password_hash, password))
    except (VerificationError, InvalidHashError):
        return False


def upgrade_hash(user: User, password: str) -> None:
    """Re-hash ``password`` (already verified) if ``user``'s hash has older parameters."""
    hasher = _hasher()
    if hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hasher.hash(password)


def user_exists(session: Session, username: str) -> bool:
    """Whether a user has this name (enabled or not)."""
    return session.scalar(select(User.id).where(User.username == username)) is not None


def _burn_time(hasher: PasswordHasher, dummy: str) -> None:
    try:
        hasher.verify(dummy, "wrong")
    except VerificationError:
        pass


def create_token(
    session: Session, *, name: str, scope: str, now: datetime, created_by: str | None = None
) -> str:
    """Create an API token for the machine client ``name``; returns the token (shown once).

    Raises
    ------
    UserError
        For a bad name, an unknown scope, or a name already taken.
    """
    if not _NAME.match(name):
        raise UserError(f"token name {name!r} is not allowed: 1-64 letters, digits, . _ @ -")
    if scope not in SCOPES:
        raise UserError(f"scope {scope!r} is unknown: use {' or '.join(SCOPES)}")
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise UserError(f"a token named {name!r} already exists")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiToken(
            name=name, token_sha256=token_digest(token), scope=scope, revoked=False, created_at=now
        )
    )
    record_audit(
        session, event_type="token.created", now=now, username=created_by, subject=name, scope=scope
    )
    return token


def revoke_token(
    session: Session, *, name: str, now: datetime, revoked_by: str | None = None
) -> None:
    """Revoke the API token ``name``: it stops working at its next request.

    Raises
    ------
    UserError
        No token has that name.
    """
    row = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if row is None:
        raise UserError(f"no API token is named {name[:64]!r}")
    row.revoked = True
    record_audit(session, event_type="token.revoked", now=now, username=revoked_by, subject=name)


def disable_user(
    session: Session, *, username: str, now: datetime, disabled_by: str | None = None
) -> int:
    """Disable ``username`` and end their browser sessions; returns how many were ended.

    Raises
    ------
    UserError
        No user has that name.
    """
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise UserError(f"no user is named {username[:64]!r}")
    user.disabled = True
    ended = cast(
        CursorResult[Any], session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    )
    record_audit(
        session,
        event_type="user.disabled",
        now=now,
        username=disabled_by,
        subject=username,
        sessions_ended=ended.rowcount,
    )
    return int(ended.rowcount)


def token_digest(token: str) -> str:
    """The stored form of a token (or of a session cookie): its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def account_for_token(session: Session, token: str, *, now: datetime) -> Account | None:
    """The machine client a bearer token belongs to, or None (unknown or revoked)."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == token_digest(token)))
    if row is None or row.revoked:
        return None
    row.last_used_at = now
    return Account(username=f"token:{row.name}", role="api", scope=row.scope)
