"""Build the web app (FastAPI): routes, error pages, security headers, static files.

``build_app(settings, session_factory)`` takes everything explicitly, so tests and the
service build the same app.  This is the web's edge of the error tree (``dicom_node.errors``):
:data:`HTTP_STATUS` is the one table from an exception to an HTTP status.  No session means a
redirect to the log-in page (pages) or 401 (API); a missing role, scope or CSRF token is 403;
an unknown study or job 404; a job in the wrong state 409; a bad parameter 422; the database
down 503; a body over its route's limit 413 (web/limits.py, which also refuses a body from a
caller not signed in before it is read); anything unexpected a plain 500 page, never a
traceback (and only the error's type is logged, since a message could quote data).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from urllib.parse import quote

import anyio
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicom_node import __version__
from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.errors import (
    AuthenticationRequiredError,
    DicomNodeError,
    InvalidRequestError,
    JobNotFoundError,
    JobStateError,
    MalformedRequestError,
    NotFoundError,
    PermissionDeniedError,
    StorageError,
    UnsupportedMediaTypeError,
)
from dicom_node.ingest import IngestContext, ingest_context
from dicom_node.ops.metrics.collect import check_readiness
from dicom_node.scp.backlog import BacklogGauge
from dicom_node.web import admin, api, pages, stow, validation
from dicom_node.web.auth import signed_in
from dicom_node.web.context import STATIC_DIR, WebContext, make_templates
from dicom_node.web.limits import BodyLimitMiddleware
from dicom_node.web.rendering import render

log = structlog.get_logger(__name__)

CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# The one translation from an exception to an HTTP status.  Starlette picks a handler along
# the exception's MRO, so the most specific class decides (CsrfError is a
# PermissionDeniedError: 403; StudyNotFoundError a NotFoundError: 404).  A routing error
# (Starlette's HTTPException: no such page, wrong method) carries its own status.
HTTP_STATUS: Mapping[type[Exception], int] = MappingProxyType(
    {
        MalformedRequestError: 400,  # a STOW-RS body that breaks multipart syntax
        AuthenticationRequiredError: 401,  # or, for a page, the redirect to log in
        PermissionDeniedError: 403,
        NotFoundError: 404,
        JobNotFoundError: 404,
        JobStateError: 409,
        UnsupportedMediaTypeError: 415,
        InvalidRequestError: 422,
        RequestValidationError: 422,  # a parameter FastAPI could not parse
        SQLAlchemyError: 503,  # the database is down: try again shortly
        StorageError: 503,  # a STOW-RS body could not be spooled: the sender retries
        Exception: 500,  # a bug: a plain page, never a traceback (_guard)
    }
)


def build_app(
    settings: Settings,
    session_factory: sessionmaker[Session],
    *,
    clock: Callable[[], datetime] = utcnow,
    ingest: IngestContext | None = None,
) -> FastAPI:
    """The worklist and API app for ``settings``, on the database of ``session_factory``.

    ``ingest`` is how STOW-RS stores instances: the SCP's context when both roles run in one
    process (one set of per-instance locks), else one of the web's own.
    """
    app = FastAPI(
        title="dicom-node AI results API",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        description=(
            "AI results for chest X-rays. AI result – decision support: not a "
            "diagnosis. Send `Authorization: Bearer <token>`."
        ),
    )
    app.state.context = WebContext(settings, session_factory, make_templates(), clock)
    # Password checks (argon2: CPU and 64 MiB each) run in worker threads, this many at once.
    app.state.ingest = ingest or ingest_context(settings, session_factory)
    app.state.backlog = BacklogGauge()  # [scp] max_backlog holds STOW-RS senders back too
    app.state.login_limiter = anyio.CapacityLimiter(settings.web.login_concurrency)
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.include_router(validation.router)
    app.include_router(api.router)
    app.include_router(stow.router)
    # Health checks for load balancers and orchestrators: no session or token (no data in them).
    app.add_api_route("/healthz", _healthz, methods=["GET"], include_in_schema=False)
    app.add_api_route("/readyz", _readyz, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for error, status in HTTP_STATUS.items():
        if issubclass(error, DicomNodeError):
            app.add_exception_handler(error, _handler(status))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_middleware(
        BodyLimitMiddleware,
        max_request_kb=settings.web.max_request_kb,
        max_stow_mb=settings.web.max_stow_mb,
        respond=error_response,
        signed_in=signed_in,
    )
    app.middleware("http")(_guard)  # outside the body limit: its answers get the headers too
    return app


def _healthz() -> Response:
    """200 while the process serves requests."""
    return PlainTextResponse("ok\n")


def _readyz(request: Request) -> Response:
    """The readiness checks of :func:`dicom_node.ops.metrics.collect.check_readiness` (database and
    storage: the web role runs no model): 200, or 503 naming each failed check."""
    context: WebContext = request.app.state.context
    ready = check_readiness(context.session_factory, Path(context.settings.storage.root))
    return JSONResponse(ready.as_json(), status_code=200 if ready.ready else 503)


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_response(request: Request, status: int, message: str) -> Response:
    """A JSON error for the API, a Store Instances Response for STOW-RS, an error page (or the
    log-in redirect) for the browser."""
    if request.url.path.startswith("/dicomweb/"):
        return stow.stow_failure(status, message)
    if _is_api(request):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": message}, status_code=status, headers=headers)
    if status == 401:
        target = quote(request.url.path, safe="/") if request.method == "GET" else "/worklist"
        return RedirectResponse(f"/login?next={target}", status_code=303)
    context: WebContext = request.app.state.context
    return render(
        context, request, "error.html", None, status_code=status, status=status, message=message
    )


def _handler(status: int) -> Callable[[Request, Exception], Response]:
    def handle(request: Request, exc: Exception) -> Response:
        return error_response(request, status, str(exc))

    return handle


def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    where = ", ".join(".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()[:5])
    return error_response(
        request, HTTP_STATUS[RequestValidationError], f"invalid value for: {where}"
    )


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    messages = {404: "there is no such page", 405: "this method is not allowed here"}
    return error_response(request, exc.status_code, messages.get(exc.status_code, str(exc.detail)))


def _database_error(request: Request, exc: Exception) -> Response:
    log.error("web.database_error", error=type(exc).__name__, path=request.url.path)
    return error_response(
        request, HTTP_STATUS[SQLAlchemyError], "the database is not available; try again shortly"
    )


async def _guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Security headers on every response; an unexpected error becomes a plain 500."""
    try:
        response = await call_next(request)
    except Exception as exc:  # the last line of defence: never a traceback page
        log.error("web.request_failed", error=type(exc).__name__, path=request.url.path)
        response = error_response(
            request,
            HTTP_STATUS[Exception],
            "something went wrong on the node; the error is in its log",
        )
    response.headers.update(SECURITY_HEADERS)
    if not request.url.path.startswith("/static/") and "cache-control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"
    return response
