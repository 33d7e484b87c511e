"""``dicom-node doctor``: run every check and print the table (or ``--json``).

The checks themselves are in :mod:`dicom_node.ops.doctor.checks`.  Exit 0
when nothing failed (warnings allowed), 1 when any check failed.  The doctor runs before the
settings are loaded, so that a broken config file is one of its rows, not an exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import textwrap
from collections.abc import Mapping

from dicom_node.cli.exits import ExitStatus
from dicom_node.clock import utcnow
from dicom_node.config.settings import resolve_config_path
from dicom_node.logs import configure_logging
from dicom_node.ops.doctor.checks import FAIL, CheckResult, run_checks

_DETAIL_WIDTH = 78


def run_doctor_command(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> ExitStatus:
    """Run the checks for ``--config`` (or its default) and print them; returns the exit code."""
    configure_logging("ERROR", "console")
    # A peer that is down is a row of the table; pynetdicom's own error line would repeat it.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    results = run_checks(resolve_config_path(args.config, environ), environ, now=utcnow())
    print(format_json(results) if args.json else format_table(results))
    failed = any(result.status == FAIL for result in results)
    return ExitStatus.FAILURE if failed else ExitStatus.OK


def format_json(results: list[CheckResult]) -> str:
    return json.dumps(
        {"ok": not any(r.status == FAIL for r in results), "checks": [vars(r) for r in results]},
        indent=2,
    )


def _wrap(text: str, subsequent_indent: str = "") -> list[str]:
    """Lines of at most the detail width, never splitting a path or a command name."""
    return textwrap.wrap(
        text,
        _DETAIL_WIDTH,
        subsequent_indent=subsequent_indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def format_table(results: list[CheckResult]) -> str:
    """An aligned table: check, status, detail, and each problem's fix on the line below."""
    width = max(len("CHECK"), *(len(r.name) for r in results))
    lines = [f"{'CHECK':<{width}}  STATUS  DETAIL"]
    indent = " " * (width + 10)
    for result in results:
        detail = _wrap(result.detail) or [""]
        status = result.status if result.status == "ok" else result.status.upper()
        lines.append(f"{result.name:<{width}}  {status:<6}  {detail[0]}")
        lines += [indent + more for more in detail[1:]]
        if result.fix and result.status != "ok":
            lines += [indent + part for part in _wrap(f"fix: {result.fix}", "     ")]
    failed = sum(r.status == FAIL for r in results)
    warned = sum(r.status == "warn" for r in results)
    lines.append("")
    lines.append(
        f"{failed} failed, {warned} warning(s), {len(results) - failed - warned} ok"
        if failed or warned
        else f"all {len(results)} checks ok"
    )
    return "\n".join(lines)
