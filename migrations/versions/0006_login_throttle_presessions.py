"""web log-in: failed log-ins per account and per address (throttling), log-in pre-sessions (CSRF)

login_failures counts wrong passwords per account (the SHA-256 of the typed name, so a mistyped
patient name is never stored) and per client address, with the time until which log-in is
refused.  login_presessions binds the log-in form's CSRF token to a cookie the server issued.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('login_failures',
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('subject', sa.String(length=64), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('last_failure_at', UTC, nullable=False),
    sa.Column('locked_until', UTC, nullable=True),
    sa.Column('refusals', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'subject', name=op.f('pk_login_failures'))
    )
    with op.batch_alter_table('login_failures', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_login_failures_last_failure_at'), ['last_failure_at'], unique=False)
    op.create_table('login_presessions',
    sa.Column('id_sha256', sa.String(length=64), nullable=False),
    sa.Column('csrf_token', sa.String(length=64), nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.PrimaryKeyConstraint('id_sha256', name=op.f('pk_login_presessions'))
    )
    with op.batch_alter_table('login_presessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_login_presessions_created_at'), ['created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('login_presessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_login_presessions_created_at'))
    op.drop_table('login_presessions')
    with op.batch_alter_table('login_failures', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_login_failures_last_failure_at'))
    op.drop_table('login_failures')
