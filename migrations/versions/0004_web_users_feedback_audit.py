"""web worklist: users, API tokens, web sessions, feedback, audit trail, peer C-ECHO results

The audit_events table is append-only: triggers refuse UPDATE and DELETE on both dialects.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('users',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('disabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('username', name=op.f('uq_users_username'))
    )
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('scope', sa.String(length=16), nullable=False),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.Column('last_used_at', UTC, nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('name', name=op.f('uq_api_tokens_name')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_api_tokens_token_sha256'))
    )
    op.create_table('web_sessions',
    sa.Column('id_sha256', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('csrf_token', sa.String(length=64), nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.Column('last_seen_at', UTC, nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_web_sessions_user_id_users')),
    sa.PrimaryKeyConstraint('id_sha256', name=op.f('pk_web_sessions'))
    )
    with op.batch_alter_table('web_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_web_sessions_user_id'), ['user_id'], unique=False)
    op.create_table('feedback',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=64), nullable=False),
    sa.Column('verdict', sa.String(length=16), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('username', sa.String(length=80), nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['analysis_results.job_id'], name=op.f('fk_feedback_job_id_analysis_results')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feedback'))
    )
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_feedback_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_feedback_study_instance_uid'), ['study_instance_uid'], unique=False)
    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('created_at', UTC, nullable=False),
    sa.Column('event_type', sa.String(length=64), nullable=False),
    sa.Column('username', sa.String(length=80), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('patient_id', sa.String(length=64), nullable=True),
    sa.Column('details', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_event_type'), ['event_type'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_study_instance_uid'), ['study_instance_uid'], unique=False)
    op.create_table('peer_echoes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('peer', sa.String(length=64), nullable=False),
    sa.Column('checked_at', UTC, nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('username', sa.String(length=80), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_peer_echoes'))
    )
    with op.batch_alter_table('peer_echoes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_peer_echoes_peer'), ['peer'], unique=False)
    # The worklist pages through studies newest first.
    op.create_index('ix_studies_first_received_at', 'studies', ['first_received_at'],
                    unique=False)
    _create_audit_triggers()


def downgrade() -> None:
    _drop_audit_triggers()
    op.drop_index('ix_studies_first_received_at', table_name='studies')
    with op.batch_alter_table('peer_echoes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_peer_echoes_peer'))
    op.drop_table('peer_echoes')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_audit_events_event_type'))
        batch_op.drop_index(batch_op.f('ix_audit_events_created_at'))
    op.drop_table('audit_events')
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_feedback_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_feedback_job_id'))
    op.drop_table('feedback')
    with op.batch_alter_table('web_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_web_sessions_user_id'))
    op.drop_table('web_sessions')
    op.drop_table('api_tokens')
    op.drop_table('users')


def _create_audit_triggers() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_events_append_only_{action.lower()} BEFORE {action} "
                "ON audit_events BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END"
            )
        return
    op.execute(
        "CREATE FUNCTION audit_events_append_only() RETURNS trigger AS $$ BEGIN "
        "RAISE EXCEPTION 'audit events are append-only'; END $$ LANGUAGE plpgsql"
    )
    op.execute(
        "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
    )


def _drop_audit_triggers() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only_update")
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only_delete")
        return
    op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
    op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")
