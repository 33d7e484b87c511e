"""The exit statuses of the ``dicom-node`` command, by name (after BSD ``sysexits.h``).

The numbers are the node's own, kept stable for scripts and timers: 0 and 1 as every Unix
tool, 2 as argparse for a bad argument (and for a bad configuration), 3 to 5 for the backup
commands (4 also for a refused labels file or validation report).  Which error exits with
which status is decided in one table, ``dicom_node.cli.main.EXIT_CODE``; every command
returns one of these.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """What ``dicom-node`` tells its caller."""

    OK = 0  # EX_OK: done; every check passed, every file was sent
    FAILURE = 1  # an operation or a check failed, or the database is unavailable
    USAGE = 2  # EX_USAGE / EX_CONFIG: a bad argument or configuration value
    CANT_CREATE = 3  # EX_CANTCREAT: the backup destination or restore target holds data
    DATA_ERR = 4  # EX_DATAERR: the backup is damaged, or a labels CSV or report is refused
    TOO_NEW = 5  # the backup was made by a newer release (its schema is unknown here)
