"""What running several nodes on one PostgreSQL needs beyond the queue's own guarantees.

Nodes compare their own clocks through the database: a study is quiet when the closing
node's clock is ``study_quiet_seconds`` past the ``last_received_at`` the receiving node
wrote, and a lease expires when the rescuing node's clock passes the ``lease_expires_at``
the claiming node wrote.  So the nodes' clocks must agree (NTP).  At start-up each node
compares its clock with the database server's and warns when they differ by more than
``CLOCK_SKEW_WARNING_SECONDS``.  SQLite is one host's file: there is nothing to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import structlog
from sqlalchemy import Engine, text

from dicom_node.clock import as_utc, utcnow

log = structlog.get_logger(__name__)

CLOCK_SKEW_WARNING_SECONDS = 2.0


def database_clock_skew(engine: Engine, clock: Callable[[], datetime] = utcnow) -> float | None:
    """Seconds this host's clock is ahead of the PostgreSQL server's (negative: behind).

    The server's ``clock_timestamp()`` is compared with the midpoint of the local readings
    taken before and after the query, so the round trip does not count.  None on SQLite.
    """
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as connection:
        before = clock()
        server = as_utc(connection.execute(text("SELECT clock_timestamp()")).scalar_one())
        after = clock()
    local = before + (after - before) / 2
    return (local - server).total_seconds()


def check_clock(engine: Engine, clock: Callable[[], datetime] = utcnow) -> float | None:
    """Warn (``clock.skew``) when this node's and the database's clocks disagree; returns
    the skew in seconds (None on SQLite)."""
    skew = database_clock_skew(engine, clock)
    if skew is not None and abs(skew) > CLOCK_SKEW_WARNING_SECONDS:
        log.warning(
            "clock.skew",
            skew_seconds=round(skew, 3),
            limit_seconds=CLOCK_SKEW_WARNING_SECONDS,
            consequence="study quiet times and job leases are measured across nodes; "
            "synchronise this host's clock (NTP)",
        )
    return skew
