"""Run and check Alembic migrations programmatically (``dicom-node db upgrade``).

The migration scripts ship inside the package (``dicom_node.migrations``, the top-level
``migrations/`` folder of the source tree), so an installed node can migrate its own database.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from dicom_node.errors import DatabaseNotMigratedError


def alembic_config(engine: Engine) -> Config:
    """An Alembic config bound to ``engine`` (env.py uses the engine, never a URL of its own)."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("dicom_node.migrations")))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database up to ``revision``."""
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database down to ``revision`` (``base`` removes every table)."""
    command.downgrade(alembic_config(engine), revision)


def head_revision(engine: Engine) -> str:
    """The newest revision this release knows."""
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    assert head is not None, "the package ships at least one migration"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def require_head(engine: Engine) -> None:
    """Refuse to run on a database that is not at this release's schema.

    Raises
    ------
    DatabaseNotMigratedError
        Naming the command that fixes it.
    """
    current, head = current_revision(engine), head_revision(engine)
    if current != head:
        raise DatabaseNotMigratedError(current, head)
