"""One row of the doctor's table, and the statuses it can have.

Apart from :mod:`dicom_node.ops.doctor.checks`, so that the check modules (``checks``, ``peers``,
``ports``, ``store``, ``tls``) all build on it and ``checks`` can import the others without an
import cycle.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class CheckResult:
    """One row of the doctor's table."""

    name: str  # what was checked, e.g. "database" or "peer pacs"
    status: str  # ok, warn or fail
    detail: str  # what was found
    fix: str = ""  # the command or edit that fixes it (empty when ok)


def service_user() -> str:
    """The name of the user the checks run as (the service's, when run as it)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"
