"""The disk reserve for what the worker writes, and how long a job waits when it is reached.

The SCP refuses images that would leave less than ``[storage] min_free_mb`` free (0xA700); the
worker keeps the same reserve for its SR, SC, heatmap and rejection-note files, so results
never fill the disk to its last byte and starve the SCP.  A full disk is transient: the job
waits (``dicom_node.jobs.queue.wait_for_space``) instead of spending its attempts.
"""

from __future__ import annotations

import errno
from pathlib import Path

from dicom_node.errors import InsufficientSpaceError, StorageError
from dicom_node.store import free_mb

MAX_WAIT_SECONDS = 600.0
# The file system's own "full" answers: no space, or the user's quota spent.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def require_free_space(root: Path, min_free_mb: int, needed_bytes: int = 0) -> None:
    """Refuse to write ``needed_bytes`` when it would leave less than ``min_free_mb`` free.

    Raises
    ------
    InsufficientSpaceError
        When the reserve would be breached (the caller waits and tries again later).
    StorageError
        When the free space of the storage root cannot be read (not mounted, say).
    """
    try:
        available = free_mb(root)
    except OSError as exc:
        raise StorageError(f"cannot read free space of the storage root: {exc.strerror}") from exc
    if available - needed_bytes / (1024 * 1024) < min_free_mb:
        raise InsufficientSpaceError(
            f"free space {available:.0f} MB is below storage.min_free_mb = {min_free_mb}"
        )


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full: our reserve check, or ENOSPC/EDQUOT from a write
    (an ``OSError``, or the ``StorageError`` that wraps one)."""
    if isinstance(exc, InsufficientSpaceError):
        return True
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    return (
        isinstance(exc, (OSError, StorageError))
        and isinstance(cause, OSError)
        and cause.errno in _FULL_ERRNOS
    )


def next_wait_seconds(
    previous_seconds: float, first_seconds: float, max_seconds: float = MAX_WAIT_SECONDS
) -> float:
    """The next wait for disk space: ``first_seconds``, then doubling, at most ``max_seconds``."""
    if previous_seconds <= 0:
        return min(first_seconds, max_seconds)
    return min(max(first_seconds, previous_seconds * 2), max_seconds)
