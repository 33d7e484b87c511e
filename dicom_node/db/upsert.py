"""INSERT ... ON CONFLICT DO NOTHING for both dialects (SQLite and PostgreSQL share the syntax)."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_ignore(session: Session, model: type, values: dict[str, Any]) -> bool:
    """Insert ``values`` unless the primary or a unique key exists; True when inserted."""
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    statement = module.insert(model).values(**values).on_conflict_do_nothing()
    return bool(cast(CursorResult[Any], session.execute(statement)).rowcount)
