"""Alembic environment: runs against the engine dicom-node hands over in config.attributes."""

from __future__ import annotations

from alembic import context

from dicom_node.db import validation  # noqa: F401  (registers its tables)
from dicom_node.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes["engine"]
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
