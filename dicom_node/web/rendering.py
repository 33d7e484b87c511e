"""Turn a template and values into an HTML response, with the signed-in principal.

Every page gets the principal (for the header, the log-out form and the CSRF field) and the
decision-support notice; templates autoescape everything.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse

from dicom_node.web.auth import Principal
from dicom_node.web.context import WebContext


def render(context: WebContext, request: Request, name: str, principal: Principal | None,
           status_code: int = 200, **values: Any) -> HTMLResponse:
    """The template ``name`` rendered with ``values``."""
    response: HTMLResponse = context.templates.TemplateResponse(
        request, name, {"principal": principal, "settings": context.settings, **values},
        status_code=status_code)
    return response
