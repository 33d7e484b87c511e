"""One row of the doctor's table, and the statuses it can have.

Apart from :mod:`dicom_node.ops.doctor.checks`, so that the check modules (``checks``, ``store``,
``tls``) all build on it and ``checks`` can import the others without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class CheckResult:
    """One row of the doctor's table."""

    name: str  # what was checked, e.g. "database" or "peer pacs"
    status: str  # ok, warn or fail
    detail: str  # what was found
    fix: str = ""  # the command or edit that fixes it (empty when ok)
