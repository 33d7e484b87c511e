"""Turn a template and values into an HTML response, with the signed-in principal, and the
display filters the templates use for DICOM values.

Every page gets the principal (for the header, the log-out form and the CSRF field) and the
decision-support notice; templates autoescape everything.  The filters only change how a
value reads: anything they do not recognise is shown exactly as received, never an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse

if TYPE_CHECKING:  # annotations only: context.py imports the filters below
    from dicom_node.web.auth import Principal
    from dicom_node.web.context import WebContext

# PS3.5 6.2 DA: YYYYMMDD; the ACR-NEMA form YYYY.MM.DD "may be encountered" in older data.
_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
# PS3.5 6.2 TM: HH[MM[SS[.F{1,6}]]] (SS may be 60, a leap second); ACR-NEMA HH:MM:SS.
_TM = re.compile(r"(\d{2}):?(\d{2})(?::?(\d{2})(?:\.\d{1,6})?)?")


def dicom_date(value: str | None) -> str:
    """A DICOM DA value as ISO 8601 ``YYYY-MM-DD``; partial or invalid values as given.

    The node stores Study Date exactly as received, so ``19010101`` reads ``1901-01-01`` and
    ``20260230`` (no such day) or ``2026`` stays as it came.
    """
    text = (value or "").strip()
    match = _DA.fullmatch(text)
    if match is None:
        return text
    year, month, day = (int(part) for part in match.groups())
    try:
        return date(year, month, day).isoformat()
    except ValueError:
        return text


def dicom_time(value: str | None) -> str:
    """A DICOM TM value as ``HH:MM`` or ``HH:MM:SS`` (fractions dropped); else as given.

    An hour alone (``09``) stays as given rather than inventing minutes.
    """
    text = (value or "").strip()
    match = _TM.fullmatch(text)
    if match is None:
        return text
    hour, minute, second = match.groups()
    if int(hour) > 23 or int(minute) > 59 or (second is not None and int(second) > 60):
        return text
    return f"{hour}:{minute}" + (f":{second}" if second is not None else "")


def percent(value: float | None) -> str:
    """A probability or threshold as a percentage; an em dash when there is none."""
    return "—" if value is None else f"{value * 100:.1f}%"


DISPLAY_FILTERS: dict[str, Callable[..., str]] = {
    "dicom_date": dicom_date,
    "dicom_time": dicom_time,
    "pct": percent,
}


def render(
    context: WebContext,
    request: Request,
    name: str,
    principal: Principal | None,
    status_code: int = 200,
    **values: Any,
) -> HTMLResponse:
    """The template ``name`` rendered with ``values``."""
    response: HTMLResponse = context.templates.TemplateResponse(
        request,
        name,
        {"principal": principal, "settings": context.settings, **values},
        status_code=status_code,
    )
    return response
