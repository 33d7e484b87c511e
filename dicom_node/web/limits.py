"""Request bodies: a size limit per route, and the caller signed in before a body is read.

A pure ASGI middleware, in front of FastAPI's routing (which reads and parses a route's whole
body before its dependencies, authentication included, run):

1. A ``Content-Length`` above the route's limit is answered 413 at once; the body is never
   read (RFC 9110 15.5.14).
2. A request with a body to any route but ``POST /login`` must name a live browser session or
   a valid API token; otherwise it gets the app's own 401 (or the log-in redirect) before a
   byte of the body is read.
3. A body without a length (chunked) is counted as it streams; once over the limit the client
   gets 413 and the route sees the client gone.

Limits are ``[web] max_request_kb`` for any route, smaller for the routes in
:data:`ROUTE_LIMITS_KB`, and ``[web] max_stow_mb`` for STOW-RS posts.  Responses that leave a
body unread close the connection.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger(__name__)

# (method, path pattern, largest body in KB): what each form or JSON body can need.
ROUTE_LIMITS_KB: tuple[tuple[str, re.Pattern[str], int], ...] = (
    ("POST", re.compile(r"/login"), 8),  # name, password, token, next page
    ("POST", re.compile(r"/logout"), 2),
    ("POST", re.compile(r"/admin/.*"), 8),  # the CSRF token and a few fields
    ("POST", re.compile(r"(/api/v1)?/studies/[^/]+/feedback"), 32),  # a 2000-character comment
)
STOW_PATH = re.compile(r"/dicomweb/studies(/[^/]+)?")  # STOW-RS: [web] max_stow_mb instead
PUBLIC_WITH_BODY = frozenset({("POST", "/login")})  # the only body read before signing in
TOO_LARGE = "the request is larger than this page or API route accepts"


def limit_bytes(method: str, path: str, max_request_kb: int, max_stow_mb: int = 0) -> int:
    """The largest body ``method path`` may send: its route's limit, at most the node's; a
    STOW-RS post, ``max_stow_mb`` (instances are megabytes, forms kilobytes)."""
    if method == "POST" and max_stow_mb > 0 and STOW_PATH.fullmatch(path):
        return max_stow_mb * 1024 * 1024
    for route_method, pattern, kilobytes in ROUTE_LIMITS_KB:
        if method == route_method and pattern.fullmatch(path):
            return min(kilobytes, max_request_kb) * 1024
    return max_request_kb * 1024


@dataclass
class _Progress:
    """How far one request's body and response have got."""

    received: int = 0
    exceeded: bool = False
    response_started: bool = False


class BodyLimitMiddleware:
    """Refuse over-long bodies and anonymous bodies before the app reads them.

    ``respond(request, status, message)`` builds the app's error response (JSON for the API,
    a page or the log-in redirect for the browser); ``signed_in(request)`` says, from the
    database, whether the request carries a live session or a valid token.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_request_kb: int,
        max_stow_mb: int = 0,
        respond: Callable[[Request, int, str], Response],
        signed_in: Callable[[Request], bool],
    ) -> None:
        self.app = app
        self.max_request_kb = max_request_kb
        self.max_stow_mb = max_stow_mb
        self.respond = respond
        self.signed_in = signed_in

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        limit = limit_bytes(method, path, self.max_request_kb, self.max_stow_mb)
        headers = Headers(scope=scope)
        declared = _content_length(headers)
        if declared is not None and declared > limit:
            log.warning("web.body_too_large", path=path, declared=declared, limit=limit)
            await self._answer(scope, receive, send, 413, TOO_LARGE)
            return
        has_body = bool(declared) or "transfer-encoding" in headers
        if has_body and (method, path) not in PUBLIC_WITH_BODY:
            refused = await self._anonymous(scope)
            if refused is not None:
                await self._send(scope, receive, send, refused)
                return
        await self._counted(scope, receive, send, limit)

    async def _anonymous(self, scope: Scope) -> Response | None:
        """The refusal for a request without a session or token (None: signed in)."""
        request = Request(scope)
        try:
            if await anyio.to_thread.run_sync(self.signed_in, request):
                return None
        except SQLAlchemyError as exc:
            log.error("web.database_error", error=type(exc).__name__, path=scope["path"])
            return self.respond(request, 503, "the database is not available; try again shortly")
        return self.respond(request, 401, "log in, or send an API token, before sending data")

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app, counting the body as it streams and stopping it once over ``limit``."""
        progress = _Progress()

        async def limited_receive() -> Message:
            if progress.exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                progress.received += len(message.get("body", b""))
                if progress.received > limit:
                    progress.exceeded = True
                    log.warning("web.body_too_large", path=scope["path"], limit=limit)
                    if not progress.response_started:
                        await self._answer(scope, receive, send, 413, TOO_LARGE)
                    return {"type": "http.disconnect"}  # the route stops reading
            return message

        async def guarded_send(message: Message) -> None:
            if progress.exceeded:
                return  # the 413 went out instead of whatever the route makes of the stop
            if message["type"] == "http.response.start":
                progress.response_started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, status: int, message: str
    ) -> None:
        await self._send(scope, receive, send, self.respond(Request(scope), status, message))

    @staticmethod
    async def _send(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
        """Send ``response`` and close the connection: the body is left unread."""
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _content_length(headers: Headers) -> int | None:
    """The declared body length, or None when there is none (or it is not a number: the
    server has already refused such a request)."""
    value = headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)
