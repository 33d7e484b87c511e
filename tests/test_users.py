"""Users and API tokens: argon2 hashes, checks, hashed tokens, and the CLI that never takes a
password from argv."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from sqlalchemy import Engine, select

from dicom_node.clock import utcnow
from dicom_node.db.models import ApiToken, AuditEvent, User, WebSession
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.errors import UserError
from dicom_node.web.auth import start_session
from dicom_node.web.users import account_for_token, add_user, authenticate, create_token
from tests.helpers import REPO, free_port, run_cli, write_config

PASSWORD = "a long enough password"


def test_passwords_are_stored_as_argon2id_and_checked(engine: Engine) -> None:
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        add_user(session, username="rad", password=PASSWORD, role="radiologist", now=utcnow())
    with session_scope(factory) as session:
        stored = session.scalar(select(User.password_hash))
        assert stored.startswith("$argon2id$") and PASSWORD not in stored
        assert authenticate(session, username="rad", password=PASSWORD) is not None
        assert authenticate(session, username="rad", password="wrong password") is None
        assert authenticate(session, username="nobody", password=PASSWORD) is None
        for kwargs in (
            {"username": "rad"},
            {"username": "x", "password": "short"},
            {"username": "x", "role": "superuser"},
            {"username": "bad name!"},
        ):
            with pytest.raises(UserError):
                add_user(
                    session, **{"password": PASSWORD, "role": "admin", "now": utcnow(), **kwargs}
                )


def test_unknown_user_name_costs_one_verification_and_no_hashing_like_a_known_one(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        add_user(session, username="rad", password=PASSWORD, role="radiologist", now=utcnow())
    calls: list[str] = []
    for name in ("hash", "verify"):
        real = getattr(PasswordHasher, name)
        monkeypatch.setattr(
            PasswordHasher,
            name,
            lambda self, *a, _r=real, _n=name, **k: (calls.append(_n), _r(self, *a, **k))[1],
        )
    with session_scope(factory) as session:
        for username in ("rad", "nobody"):
            calls.clear()
            assert authenticate(session, username=username, password="wrong password") is None
            assert calls == ["verify"], username


def test_api_tokens_are_shown_once_stored_hashed_and_read_only_by_default(engine: Engine) -> None:
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        token = create_token(session, name="ris", scope="read", now=utcnow())
    with session_scope(factory) as session:
        assert session.scalar(select(ApiToken.token_sha256)) != token
        account = account_for_token(session, token, now=utcnow())
        assert account is not None and account.scope == "read" and account.username == "token:ris"
        assert account_for_token(session, token + "x", now=utcnow()) is None


def test_users_cli_reads_the_password_from_stdin_and_prints_a_token_once(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "n.toml",
        root=tmp_path / "s",
        db_url=f"sqlite:///{tmp_path / 'n.db'}",
        port=free_port(),
    )
    assert run_cli(config, "db", "upgrade").returncode == 0
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "--config",
            str(config),
            "users",
            "add",
            "boss",
            "--role",
            "admin",
        ],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert added.returncode == 0 and "user boss created (admin)" in added.stdout
    assert PASSWORD not in added.stdout + added.stderr
    listed = run_cli(config, "users", "list")
    assert "boss" in listed.stdout and "admin" in listed.stdout
    token = run_cli(config, "users", "token", "ris", "--scope", "write")
    assert token.returncode == 0 and token.stdout.splitlines()[-1].startswith("dnt_")
    again = run_cli(config, "users", "token", "ris")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert run_cli(config, "users", "add", "x", "--role", "nurse").returncode == 2
    _revoking_and_disabling_through_the_cli_take_effect_at_once(
        config, tmp_path / "n.db", token.stdout.splitlines()[-1]
    )


def _revoking_and_disabling_through_the_cli_take_effect_at_once(
    config: Path, database: Path, token: str
) -> None:
    factory = make_session_factory(make_engine(f"sqlite:///{database}"))
    with session_scope(factory) as session:
        boss = session.scalar(select(User).where(User.username == "boss"))
        start_session(session, boss, now=utcnow())
    revoked = run_cli(config, "users", "token-revoke", "ris")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    disabled = run_cli(config, "users", "disable", "boss")
    assert disabled.returncode == 0 and "1 open session(s) ended" in disabled.stdout
    with session_scope(factory) as session:
        assert account_for_token(session, token, now=utcnow()) is None
        assert session.scalars(select(WebSession)).all() == []
        assert authenticate(session, username="boss", password=PASSWORD) is None
        events = session.scalars(select(AuditEvent.event_type)).all()
    assert {"token.revoked", "user.disabled"} <= set(events)
