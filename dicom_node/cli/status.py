"""``dicom-node status``: counts of studies, instances, and jobs per kind and state."""

from __future__ import annotations

import argparse

from sqlalchemy import func, select

from dicom_node.cli.db import command_engine
from dicom_node.cli.exits import ExitStatus
from dicom_node.config.settings import Settings
from dicom_node.db.models import Instance, Study
from dicom_node.db.session import make_session_factory, session_scope
from dicom_node.jobs.queue import count_by_state


def run_status_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Print the counts from a migrated database."""
    with command_engine(settings) as engine, session_scope(make_session_factory(engine)) as session:
        studies = session.scalar(select(func.count()).select_from(Study))
        instances = session.scalar(select(func.count()).select_from(Instance))
        counts = count_by_state(session)
    print(f"studies: {studies}")
    print(f"instances: {instances}")
    print("jobs:" if counts else "jobs: none")
    for (kind, state), count in sorted(counts.items()):
        print(f"  {kind:<10} {state:<11} {count}")
    return ExitStatus.OK
