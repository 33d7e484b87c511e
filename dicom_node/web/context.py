"""What every web route needs, passed explicitly: settings, sessions, templates and the clock.

``build_app`` creates one :class:`WebContext` and keeps it on ``app.state``; routes reach it
through :func:`get_context`.  Nothing here is module-level state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.clock import as_utc
from dicom_node.config.settings import Settings
from dicom_node.db.session import session_scope
from dicom_node.outputs.sr import AI_NOTICE
from dicom_node.web.rendering import DISPLAY_FILTERS

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class WebContext:
    """The web app's dependencies: explicit, built once per app."""

    settings: Settings
    session_factory: sessionmaker[Session]
    templates: Jinja2Templates
    clock: Callable[[], datetime]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One database transaction: committed before the response is built."""
        with session_scope(self.session_factory) as session:
            yield session


def make_templates() -> Jinja2Templates:
    """Jinja2 templates with autoescaping on for every file, so patient text is shown as text."""
    environment = Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.globals["AI_NOTICE"] = AI_NOTICE
    environment.filters["pct"] = lambda value: "-" if value is None else f"{value * 100:.1f}%"
    environment.filters["when"] = _when
    environment.filters.update(DISPLAY_FILTERS)  # DICOM dates/times, em dash for no value
    return Jinja2Templates(env=environment)


def _when(value: datetime | None) -> str:
    """A time as UTC text (PostgreSQL hands back the server's zone, SQLite naive UTC)."""
    if value is None:
        return "-"
    return as_utc(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def get_context(request: Request) -> WebContext:
    """The app's context (a FastAPI dependency)."""
    context: WebContext = request.app.state.context
    return context
