"""audit trail: audit_events.event_uuid, so a row spooled during a database outage is written once

The node sets it before the first attempt; the spool drain skips a UUID the table holds.  Old
rows keep NULL (a unique index admits any number of NULLs on both dialects).  Added with ALTER
TABLE and CREATE INDEX, never a batch table copy, so the append-only triggers stay in place.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('audit_events', sa.Column('event_uuid', sa.String(length=32), nullable=True))
    op.create_index(op.f('ix_audit_events_event_uuid'), 'audit_events', ['event_uuid'],
                    unique=True)


def downgrade() -> None:
    op.drop_index(op.f('ix_audit_events_event_uuid'), table_name='audit_events')
    op.drop_column('audit_events', 'event_uuid')
