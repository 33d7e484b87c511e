"""``dicom-node db upgrade|downgrade|current``, and the database every other command opens."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from sqlalchemy import Engine

from dicom_node.cli.exits import ExitStatus
from dicom_node.config.settings import Settings
from dicom_node.db import migrate
from dicom_node.db.session import make_engine


@contextlib.contextmanager
def command_engine(settings: Settings, *, migrated: bool = True) -> Iterator[Engine]:
    """The database for one command, checked to be at this release's schema when asked
    (``DatabaseNotMigratedError`` names the fix)."""
    engine = make_engine(settings.database_url, settings.database.busy_timeout_ms)
    try:
        if migrated:
            migrate.require_head(engine)
        yield engine
    finally:
        engine.dispose()


def run_db_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Migrate the schema up or down, or print its revision."""
    with command_engine(settings, migrated=False) as engine:
        if args.db_command == "upgrade":
            migrate.upgrade(engine)
            print(f"database at revision {migrate.current_revision(engine)} (head)")
        elif args.db_command == "downgrade":
            migrate.downgrade(engine, args.revision or "base")
            print(f"database at revision {migrate.current_revision(engine) or 'base'}")
        else:
            current = migrate.current_revision(engine)
            head = migrate.head_revision(engine)
            print(f"database at revision {current or 'base'}; this release needs {head}")
    return ExitStatus.OK
