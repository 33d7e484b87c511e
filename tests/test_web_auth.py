"""Web security: no data without a session or token, roles, CSRF, cookies, timeouts, escaping."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import httpx
from fastapi.routing import APIRoute
from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.db.models import AuditEvent, Job, Output, WebSession
from dicom_node.db.session import session_scope
from dicom_node.web import admin, api, pages, validation
from tests.web_support import PASSWORD, SCRIPT_NAME, Seeded, csrf_from, login

PUBLIC = {("GET", "/login"), ("POST", "/login"), ("GET", "/openapi.json")}


def _routes(seeded: Any) -> list[tuple[str, str]]:
    """Every route of the real app, with its path parameters filled from the seeded node."""
    with session_scope(seeded.node.session_factory) as session:
        job_id = session.scalars(select(Job.id)).first()
        sop = session.scalars(select(Output.sop_instance_uid)).first()
    values = {
        "study_instance_uid": seeded.uids["critical_old"],
        "sop_instance_uid": sop,
        "job_id": str(job_id),
        "peer_name": "echo-pacs",
    }
    found = []
    for route in [
        *pages.router.routes,
        *admin.router.routes,
        *validation.router.routes,
        *api.router.routes,
    ]:
        if isinstance(route, APIRoute):
            path = re.sub(r"{(\w+)}", lambda m: str(values[m.group(1)]), route.path)
            found += [(method, path) for method in route.methods]
    return found


def test_every_page_and_api_route_without_a_session_gets_401_or_the_login_redirect(
    seeded: Seeded,
) -> None:
    routes = _routes(seeded)
    assert len(routes) >= 15
    with httpx.Client(base_url=seeded.url, follow_redirects=False) as client:
        for method, path in routes:
            if (method, path) in PUBLIC:
                continue
            response = client.request(method, path)
            if path.startswith("/api/"):
                assert response.status_code == 401, (method, path)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "patient" not in response.text.lower()
            else:
                assert response.status_code == 303, (method, path, response.status_code)
                assert response.headers["location"].startswith("/login")
        assert client.get("/openapi.json").status_code == 200
        assert (
            client.get(
                "/api/v1/worklist", headers={"Authorization": "Bearer dnt_wrong"}
            ).status_code
            == 401
        )


def test_radiologist_gets_403_on_admin_routes_and_every_post_needs_its_csrf_token(
    seeded: Seeded,
) -> None:
    rad = login(seeded.url)
    token = csrf_from(rad.get("/worklist").text)
    with session_scope(seeded.node.session_factory) as session:
        job_id = session.scalars(select(Job.id)).first()
    for path in ("/admin", f"/admin/jobs/{job_id}/retry", "/admin/peers/echo-pacs/echo"):
        method = "GET" if path == "/admin" else "POST"
        assert rad.request(method, path, data={"csrf_token": token}).status_code == 403, path
    study = seeded.uids["critical_old"]
    boss = login(seeded.url, "boss")
    boss_token = csrf_from(boss.get("/admin").text)
    for client, path, data in (
        (rad, f"/studies/{study}/feedback", {"label": "Pneumothorax", "verdict": "agree"}),
        (rad, "/logout", {}),
        (boss, "/admin/peers/echo-pacs/echo", {}),
        (boss, f"/admin/jobs/{job_id}/retry", {}),
    ):
        assert client.post(path, data=data).status_code == 403, path
        assert client.post(path, data={**data, "csrf_token": "forged"}).status_code == 403
    # A JSON call with the session cookie needs the token in a header.
    body = {"label": "Pneumothorax", "verdict": "agree"}
    assert rad.post(f"/api/v1/studies/{study}/feedback", json=body).status_code == 403
    assert (
        rad.post(
            f"/api/v1/studies/{study}/feedback", json=body, headers={"X-CSRF-Token": token}
        ).status_code
        == 201
    )
    # The log-in form itself is protected (double submit) ...
    fresh = httpx.Client(base_url=seeded.url)
    fresh.get("/login")
    assert fresh.post("/login", data={"username": "rad", "password": PASSWORD}).status_code == 403
    # ... and with its token the right admin actions go through.
    assert (
        boss.post("/admin/peers/echo-pacs/echo", data={"csrf_token": boss_token}).status_code == 303
    )
    assert "status 0x0000" in boss.get("/admin").text


def test_session_cookie_is_httponly_strict_and_idle_sessions_end(seeded: Seeded) -> None:
    client = httpx.Client(base_url=seeded.url, follow_redirects=False)
    page = client.get("/login")
    response = client.post(
        "/login", data={"username": "rad", "password": PASSWORD, "csrf_token": csrf_from(page.text)}
    )
    cookie = response.headers["set-cookie"]
    assert "dn_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Secure" not in cookie  # [web] secure_cookies is off in this test node
    assert client.get("/worklist").status_code == 200
    wrong = httpx.Client(base_url=seeded.url).get("/login")
    failed = httpx.Client(base_url=seeded.url, cookies=wrong.cookies).post(
        "/login",
        data={"username": "rad", "password": "wrong password", "csrf_token": csrf_from(wrong.text)},
    )
    assert failed.status_code == 401 and "wrong" in failed.text
    with session_scope(seeded.node.session_factory) as session:
        for row in session.scalars(select(WebSession)):
            row.last_seen_at = utcnow() - timedelta(minutes=31)
    assert client.get("/worklist").status_code == 303  # idle for longer than 30 minutes
    with session_scope(seeded.node.session_factory) as session:
        outcomes = session.scalars(
            select(AuditEvent.outcome).where(AuditEvent.event_type == "user.login")
        ).all()
    assert sorted(outcomes) == ["failure", "success"]


def test_script_patient_name_is_escaped_and_bad_input_gets_a_clear_status(seeded: Seeded) -> None:
    client = login(seeded.url)
    worklist = client.get("/worklist").text
    assert SCRIPT_NAME not in worklist and "&lt;script&gt;alert(1)&lt;/script&gt;" in worklist
    study = client.get(f"/studies/{seeded.uids['script']}")
    assert study.status_code == 200 and SCRIPT_NAME not in study.text
    assert "script-src 'self'" in study.headers["content-security-policy"]
    unknown = client.get("/studies/1.2.3.4.5")
    assert unknown.status_code == 404 and "Traceback" not in unknown.text
    assert client.get("/studies/not-a-uid").status_code == 404
    assert client.get("/worklist?status=bogus").status_code == 422
    assert client.get("/worklist?date_from=yesterday").status_code == 422
    assert client.get(f"/studies/{seeded.uids['script']}/image.png?finding=Nope").status_code == 422
