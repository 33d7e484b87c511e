"""The doctor's checks of what a crash or an outage left in the storage root.

``orphan files``: what the last start-up's reconciliation did with files no row named
(adopted, quarantined; :mod:`dicom_node.ops.reconcile`), and what waits in ``quarantine/``: a
warning while it is not empty, since each file there is an instance the node does not hold.
``audit spool``: audit rows written during a database outage that are not in the table yet
(:mod:`dicom_node.audit.spool`), and the spool's permissions (it may hold patient IDs).
Both only read.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from dicom_node.audit.spool import DRAIN_INTERVAL_SECONDS, AuditSpool, pending_events
from dicom_node.clock import as_utc
from dicom_node.config.settings import Settings
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.ops.doctor.result import OK, WARN, CheckResult
from dicom_node.ops.reconcile import last_reconciliation, quarantined_files
from dicom_node.store import QUARANTINE_DIR


def _last_start(settings: Settings) -> str:
    """The last reconciliation's counts as a phrase, or why they are unknown."""
    if (
        settings.database_url.startswith("sqlite")
        and not Path(settings.database_url.split("///", 1)[-1]).is_file()
    ):
        return "last start-up: unknown (no database)"
    engine = make_engine(settings.database_url, settings.database.busy_timeout_ms)
    try:
        with session_scope(make_session_factory(engine)) as session:
            last = last_reconciliation(session)
    except SQLAlchemyError:
        return "last start-up: unknown (database unavailable)"
    finally:
        engine.dispose()
    if last is None:
        return "no start-up found files without a row"
    when, counts = last
    return (
        f"start-up of {as_utc(when):%Y-%m-%d %H:%M} UTC: of the files without a row, "
        f"{counts.get('adopted', 0)} adopted, {counts.get('quarantined', 0)} quarantined; "
        f"{counts.get('temp_files_removed', 0)} temp file(s) removed"
    )


def check_orphan_files(settings: Settings) -> CheckResult:
    """Files a crash left without a row: adopted at start-up, or waiting in quarantine."""
    root = Path(settings.storage.root)
    last = _last_start(settings)
    held = quarantined_files(root)
    if not held:
        return CheckResult("orphan files", OK, f"{last}; {QUARANTINE_DIR}/ is empty")
    reasons = Counter(reason for _, reason in held)
    listed = "; ".join(f"{count} × {reason}" for reason, count in reasons.most_common(3))
    return CheckResult(
        "orphan files",
        WARN,
        f"{len(held)} file(s) in {root / QUARANTINE_DIR} that the node does not hold "
        f"({listed}); {last}",
        "read each file's .reason.json; have the sender send again what is missing (the "
        "node holds nothing of a quarantined file), then delete the file and its reason",
    )


def check_audit_spool(settings: Settings) -> CheckResult:
    """Audit rows spooled during a database outage and not yet written; the spool's modes."""
    spool = AuditSpool.under(Path(settings.storage.root))
    if not spool.directory.exists():
        return CheckResult("audit spool", OK, "no audit rows wait for the database")
    loose = [
        path.name
        for path in [spool.directory, *spool.directory.iterdir()]
        if path.stat().st_mode & 0o077
    ]
    if loose:
        return CheckResult(
            "audit spool",
            WARN,
            f"{spool.directory} holds patient IDs but is readable by others "
            f"({', '.join(loose[:3])})",
            f"chmod 700 {spool.directory}; chmod 600 {spool.directory}/*",
        )
    pending = pending_events(spool)
    if pending:
        return CheckResult(
            "audit spool",
            WARN,
            f"{pending} audit row(s) in {spool.directory} wait for the database",
            "check the database row above; the running node writes them "
            f"within {DRAIN_INTERVAL_SECONDS:.0f} s of the database answering "
            "(or at its next start)",
        )
    return CheckResult("audit spool", OK, "no audit rows wait for the database")
