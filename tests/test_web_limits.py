"""Request bodies on a real uvicorn server: a Content-Length over the route's limit gets 413
before the body is read, a chunked body is cut off with 413 once over, and a body to a route
that needs a session or token is refused (401 or the log-in redirect) before it is read.

Each request goes over a raw socket that sends the head and a small part of the body, then
waits for the answer: a server that read (or waited for) the rest would never answer."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dicom_node.clock import utcnow
from dicom_node.config.settings import WebSettings
from dicom_node.db.session import make_session_factory, session_scope
from dicom_node.web.server import WebServer, start_web_server
from dicom_node.web.users import create_token
from tests.conftest import make_settings

ANSWER_TIMEOUT = 15.0  # liveness only: the answer comes at once, or never
STUDY = "1.2.826.0.1.3680043.8.498.1"
MB300 = 300 * 1024 * 1024


@dataclass
class Served:
    server: WebServer
    write_token: str

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture
def served(engine: Any, tmp_path: Path) -> Iterator[Served]:
    settings = make_settings(
        tmp_path,
        engine.url.render_as_string(hide_password=False),
        web=WebSettings(host="127.0.0.1", port=0),
    )
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        token = create_token(session, name="ris-writer", scope="write", now=utcnow())
    server = start_web_server(settings, factory, port=0)
    try:
        yield Served(server, token)
    finally:
        server.stop()


def _send(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """Send the head and ``body`` (only a part of what the head announces); the answer."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        + "\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as sock:
        sock.sendall(head.encode("ascii") + body)
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)  # socket.timeout here: the server awaits the body
            except ConnectionResetError:  # closed with some of what was sent unread
                chunk = b""
            if not chunk:  # the server closed: the rest of the body is unwanted
                assert answer, "the server closed without an answer"
                return answer
            answer += chunk


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _chunks(total: int, size: int = 4096) -> bytes:
    """``total`` bytes as HTTP/1.1 chunks, without the last (zero) chunk."""
    return b"".join(b"%x\r\n" % size + b"a" * size + b"\r\n" for _ in range(total // size))


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def test_a_300_mb_post_to_login_gets_413_before_its_body_is_read(served: Served) -> None:
    answer = _send(
        served.port,
        "POST",
        "/login",
        {**FORM, "Content-Length": str(MB300)},
        b"username=rad&password=" + b"x" * 1000,
    )
    assert _status(answer) == 413
    assert b"connection: close" in answer.lower()
    assert b"Traceback" not in answer


def test_a_300_mb_post_to_an_api_route_gets_413_even_with_a_valid_token(served: Served) -> None:
    answer = _send(
        served.port,
        "POST",
        f"/api/v1/studies/{STUDY}/feedback",
        {
            "Authorization": f"Bearer {served.write_token}",
            "Content-Type": "application/json",
            "Content-Length": str(MB300),
        },
        b'{"label": "Pneumothorax", "verdict": "agree", "comment": "' + b"x" * 1000,
    )
    assert _status(answer) == 413
    assert b'"detail"' in answer and b"larger than" in answer


def test_a_chunked_body_gets_413_once_it_is_over_the_routes_limit(served: Served) -> None:
    login = _send(
        served.port, "POST", "/login", {**FORM, "Transfer-Encoding": "chunked"}, _chunks(12 * 1024)
    )  # /login reads at most 8 KB
    assert _status(login) == 413
    api = _send(
        served.port,
        "POST",
        f"/api/v1/studies/{STUDY}/feedback",
        {
            "Authorization": f"Bearer {served.write_token}",
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
        },
        _chunks(40 * 1024),
    )  # feedback reads at most 32 KB
    assert _status(api) == 413


def test_an_anonymous_body_to_an_authenticated_route_is_refused_before_it_is_read(
    served: Served,
) -> None:
    api = _send(
        served.port,
        "POST",
        f"/api/v1/studies/{STUDY}/feedback",
        {"Content-Type": "application/json", "Content-Length": str(20 * 1024)},
        b'{"label": "Pneumothorax"',
    )  # 20 KB announced (under the limit), 24 bytes sent
    assert _status(api) == 401 and b"www-authenticate: bearer" in api.lower()
    forged = _send(
        served.port,
        "POST",
        f"/api/v1/studies/{STUDY}/feedback",
        {
            "Authorization": "Bearer dnt_not-a-token",
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
        },
        _chunks(8192),
    )
    assert _status(forged) == 401
    page = _send(
        served.port,
        "POST",
        f"/studies/{STUDY}/feedback",
        {**FORM, "Content-Length": str(20 * 1024)},
        b"label=Pneumothorax",
    )
    assert _status(page) == 303 and b"location: /login" in page.lower()


def test_a_streamed_anonymous_body_is_not_pulled_past_what_the_sockets_buffer(
    served: Served,
) -> None:
    pulled = 0
    total = 256 * 1024 * 1024

    def body() -> Iterator[bytes]:
        nonlocal pulled
        while pulled < total:
            pulled += 64 * 1024
            yield b"a" * (64 * 1024)

    with httpx.Client(timeout=ANSWER_TIMEOUT) as client:
        response = client.post(
            f"http://127.0.0.1:{served.port}/api/v1/studies/{STUDY}/feedback",
            content=body(),
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 401
    assert pulled < total // 4  # the rest stayed in the generator: the server closed


def test_bodies_within_their_limits_still_work(served: Served) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=30) as client:
        page = client.get("/login")
        assert page.status_code == 200
        wrong = client.post(
            "/login", data={"username": "nobody", "password": "x" * 2000, "csrf_token": "x"}
        )
        assert wrong.status_code == 403  # read and checked (the token is not the server's)
        unknown = client.post(
            f"/api/v1/studies/{STUDY}/feedback",
            headers={"Authorization": f"Bearer {served.write_token}"},
            json={"label": "Pneumothorax", "verdict": "agree", "comment": "c" * 2000},
        )
        assert unknown.status_code == 404  # read, parsed, authorised: the study is not here
