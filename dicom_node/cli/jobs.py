"""``dicom-node jobs retry ID``: the admin page's retry button, from a terminal.

Both take the same path (:func:`dicom_node.ops.actions.retry_job`) and leave the same audit
row (``job.retried``), here with the user name ``cli``.
"""

from __future__ import annotations

import argparse

from dicom_node.audit.trail import record_audit
from dicom_node.cli.db import command_engine
from dicom_node.cli.exits import ExitStatus
from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.session import make_session_factory, session_scope
from dicom_node.ops.actions import retry_job


def run_jobs_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Re-queue a dead or failed job (JobNotFoundError, JobStateError when it cannot be)."""
    with command_engine(settings) as engine, session_scope(make_session_factory(engine)) as session:
        message = retry_job(
            session, args.job_id, now=utcnow(), analysis_attempts=settings.scheduler.max_attempts
        )
        record_audit(
            session,
            event_type="job.retried",
            now=utcnow(),
            username="cli",
            job_id=args.job_id,
            message=message,
        )
    print(message)
    return ExitStatus.OK
