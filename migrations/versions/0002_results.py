"""job claim log, analysis results and findings; instances.field_of_view_mm

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('field_of_view_mm', sa.Float(), nullable=True))
    op.create_table('analysis_results',
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('model_name', sa.String(length=64), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('weights_sha256', sa.String(length=64), nullable=False),
    sa.Column('weights_status', sa.String(length=16), nullable=False),
    sa.Column('thresholds_source', sa.String(length=64), nullable=False),
    sa.Column('notes', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_analysis_results_job_id_jobs')),
    sa.PrimaryKeyConstraint('job_id', name=op.f('pk_analysis_results'))
    )
    with op.batch_alter_table('analysis_results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_analysis_results_study_instance_uid'), ['study_instance_uid'], unique=False)

    op.create_table('job_claims',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=128), nullable=False),
    sa.Column('lease_token', sa.String(length=64), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_claims_job_id_jobs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_claims')),
    sa.UniqueConstraint('job_id', 'attempt', name='uq_job_claims_job_id_attempt')
    )
    with op.batch_alter_table('job_claims', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_claims_job_id'), ['job_id'], unique=False)

    op.create_table('findings',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=64), nullable=False),
    sa.Column('probability', sa.Float(), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=True),
    sa.Column('positive', sa.Boolean(), nullable=False),
    sa.Column('boxes', sa.Text(), nullable=True),
    sa.Column('heatmap_path', sa.String(length=512), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['analysis_results.job_id'], name=op.f('fk_findings_job_id_analysis_results')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_findings')),
    sa.UniqueConstraint('job_id', 'label', name='uq_findings_job_id_label')
    )
    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_findings_job_id'), ['job_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('field_of_view_mm')
    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_findings_job_id'))

    op.drop_table('findings')
    with op.batch_alter_table('job_claims', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_claims_job_id'))

    op.drop_table('job_claims')
    with op.batch_alter_table('analysis_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_analysis_results_study_instance_uid'))

    op.drop_table('analysis_results')
