"""Log-in throttling and the log-in form's pre-session: wrong passwords per account and per
address lead to 429 with Retry-After (the password unchecked) until the backoff passes, held in
the database for every web process; the form's CSRF token must be one the server issued."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from dicom_node.db.models import AuditEvent, LoginFailure, LoginPresession
from dicom_node.web.app import build_app
from dicom_node.web.csrf import LOGIN_COOKIE
from dicom_node.web.throttle import ACCOUNT, ADDRESS
from tests.helpers import REPO
from tests.web_db import WebDb, web_db
from tests.web_support import PASSWORD, csrf_from

WRONG = "not the password"


def _form(client: TestClient) -> str:
    """GET /login (the server stores a pre-session and sets its cookie); the form's token."""
    page = client.get("/login")
    assert page.status_code == 200
    return csrf_from(page.text)


def _post(client: TestClient, token: str, username: str = "rad", password: str = PASSWORD) -> Any:
    return client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token}
    )


def _logins(db: WebDb) -> list[tuple[str | None, str, str | None]]:
    """(username, outcome, reason) of every user.login audit row, oldest first."""
    with db.session() as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "user.login").order_by(AuditEvent.id)
        ).all()
        return [(r.username, r.outcome, json.loads(r.details or "{}").get("reason")) for r in rows]


def test_six_wrong_passwords_lock_the_account_with_429_even_for_the_right_one_until_the_backoff(
    engine: Any, tmp_path: Path
) -> None:
    db = web_db(engine, tmp_path, login_free_failures=5, login_backoff_seconds=2.0)
    token = _form(db.client)
    for _ in range(6):
        assert _post(db.client, token, password=WRONG).status_code == 401
    refused = _post(db.client, token)  # the right password, but the account is waiting
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
    assert "Too many failed log-ins" in refused.text and "dn_session" not in refused.cookies
    assert _post(db.client, token, password=WRONG).status_code == 429  # not counted
    db.clock.advance(seconds=2.5)
    assert _post(db.client, token, password=WRONG).status_code == 401  # the 7th wrong one
    doubled = _post(db.client, token)
    assert doubled.status_code == 429 and doubled.headers["retry-after"] == "4"
    db.clock.advance(seconds=4.5)
    assert _post(db.client, token).status_code == 303
    assert _logins(db) == [
        *[("rad", "failure", "wrong_password")] * 6,
        ("rad", "failure", "throttled"),  # the first refusal of a wait
        ("rad", "failure", "wrong_password"),
        ("rad", "failure", "throttled"),
        ("rad", "success", None),
    ]
    with db.session() as session:  # the success cleared the account, not the address
        kinds = session.scalars(select(LoginFailure.kind)).all()
    assert kinds == [ADDRESS]


def test_wrong_passwords_across_many_names_from_one_address_throttle_that_address(
    engine: Any, tmp_path: Path
) -> None:
    db = web_db(engine, tmp_path, login_free_failures=5, login_backoff_seconds=0.5)
    token = _form(db.client)
    for n in range(6):  # a sweep: one guess each for six names, none of them a user
        assert _post(db.client, token, username=f"guess{n}", password=WRONG).status_code == 401
    refused = _post(db.client, token)  # rad's right password, from the same address
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    db.clock.advance(seconds=0.6)
    assert _post(db.client, token).status_code == 303
    logins = _logins(db)
    assert logins[:6] == [(None, "failure", "wrong_password")] * 6  # no typed name kept
    assert logins[6:] == [("rad", "failure", "throttled"), ("rad", "success", None)]
    with db.session() as session:
        rows = session.scalars(select(LoginFailure)).all()
        assert all("guess" not in row.subject for row in rows)  # names only as SHA-256
        assert {row.kind for row in rows} == {ACCOUNT, ADDRESS}


def test_the_throttle_is_held_in_the_database_for_every_web_process(
    engine: Any, tmp_path: Path
) -> None:
    db = web_db(engine, tmp_path, login_free_failures=5, login_backoff_seconds=60.0)
    settings = db.client.app.state.context.settings  # type: ignore[attr-defined]
    other = TestClient(build_app(settings, db.factory, clock=db.clock), follow_redirects=False)
    first, second = _form(db.client), _form(other)
    for client, token in ((db.client, first), (other, second)) * 3:
        assert _post(client, token, password=WRONG).status_code == 401
    refused = _post(db.client, first)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
    assert _post(other, second).status_code == 429


def test_a_login_cookie_and_field_the_client_chose_are_refused_403(
    engine: Any, tmp_path: Path
) -> None:
    db = web_db(engine, tmp_path)
    db.client.cookies.set(LOGIN_COOKIE, "chosen-by-the-attacker", path="/login")
    forged = _post(db.client, "chosen-by-the-attacker")  # cookie and field agree: not enough
    assert forged.status_code == 403 and "dn_session" not in forged.cookies
    issued = _form(db.client)  # a real pre-session (new cookie) ...
    assert _post(db.client, "chosen-by-the-attacker").status_code == 403  # ... its token only
    other = TestClient(db.client.app, follow_redirects=False)
    assert _post(db.client, _form(other)).status_code == 403  # another form's token
    assert _logins(db) == []  # refused before any password was looked at
    assert _post(db.client, issued).status_code == 303
    with db.session() as session:  # the used pre-session is gone; the other form's stays
        assert len(session.scalars(select(LoginPresession)).all()) == 1


def test_a_login_form_older_than_fifteen_minutes_is_refused(engine: Any, tmp_path: Path) -> None:
    db = web_db(engine, tmp_path)
    token = _form(db.client)
    db.clock.advance(minutes=16)
    assert _post(db.client, token).status_code == 403
    assert _post(db.client, _form(db.client)).status_code == 303


def test_importing_the_web_app_computes_no_argon2_hash() -> None:
    code = (
        "import dicom_node.web.app, dicom_node.web.users as u; "
        "print(u._dummy_hash.cache_info().currsize)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"
