"""Configure structlog once, and route the libraries' stdlib loggers through it.

Logs never carry patient data (name, ID, birth date) at any level.  Our own events name UIDs,
AE titles and job ids only; as a second line of defence a processor drops any PHI-named key,
and messages from pydicom and Python warnings (which can quote element values) are replaced by
their logger name and level.  This module must not decide what to log, only how.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict

PHI_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "patientname",
        "patientid",
        "patientbirthdate",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "other_patient_ids",
        "patient_address",
        "OtherPatientIDs",
        "PatientAddress",
    }
)
# Libraries whose messages may quote data element values; their text is never logged.
# python-multipart can quote form fields (a feedback comment may name a patient).
_REDACTED_LOGGERS = ("pydicom", "highdicom", "py.warnings", "python_multipart", "multipart")
# Libraries that are chatty below INFO and add nothing for an administrator.
_CAPPED_LOGGERS = {
    "pynetdicom": logging.INFO,
    "pydicom": logging.WARNING,
    "apscheduler": logging.WARNING,
    "sqlalchemy": logging.WARNING,
    "alembic": logging.INFO,
    "PIL": logging.WARNING,
    "highdicom": logging.WARNING,
    "python_multipart": logging.WARNING,
    "multipart": logging.WARNING,
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "asyncio": logging.WARNING,
    "uvicorn": logging.INFO,
}
# uvicorn's own handlers are replaced: its records (the access log too) go through ours.
# The access log prints the URL path; the web routes carry only UIDs and labels, never PHI.
_ROUTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def _drop_phi(_: Any, __: str, event_dict: EventDict) -> EventDict:
    for key in list(event_dict):
        if key in PHI_KEYS:
            del event_dict[key]
    # uvicorn passes a terminal-coloured copy of its message as an extra; the plain one is
    # already the event, and ANSI escapes have no place in a JSON log line.
    event_dict.pop("color_message", None)
    return event_dict


def _redact_library_text(_: Any, __: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    if record is not None and record.name.split(".")[0] in _REDACTED_LOGGERS:
        event_dict["event"] = f"{record.name}.message_redacted"
        event_dict.pop("exc_info", None)
    return event_dict


def configure_logging(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Send structlog and stdlib records, as one JSON (or console) line each, to ``stream``.

    Parameters
    ----------
    level : str
        DEBUG, INFO, WARNING or ERROR, for the node's own events.
    fmt : str
        ``json`` (for journald and log shippers) or ``console`` (for a terminal).
    stream : TextIO, optional
        Defaults to standard error, so command output on standard output stays clean.
    """
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_phi,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_phi],  # extras too
        processors=[
            _redact_library_text,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _ROUTED_LOGGERS:
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    for name, cap in _CAPPED_LOGGERS.items():
        logging.getLogger(name).setLevel(max(cap, logging.getLevelName(level)))
    logging.captureWarnings(True)
