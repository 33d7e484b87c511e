"""local validation: model modes, job and result modes, labels, reports, operating points, drift

Analysis jobs now name their model (``target``) and mode; existing ones were the one live
model's.  Added with ALTER TABLE and new tables only.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column('jobs', sa.Column('mode', sa.String(length=8), nullable=True))
    op.execute("UPDATE jobs SET mode = 'live' WHERE kind = 'analysis'")
    op.add_column('analysis_results',
                  sa.Column('thresholds_version', sa.String(length=64), nullable=True))
    op.add_column('analysis_results', sa.Column('mode', sa.String(length=8), nullable=False,
                                                server_default='live'))
    op.add_column('analysis_results', sa.Column('features', sa.Text(), nullable=True))
    op.create_table(
        'ground_truth_labels',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('finding', sa.String(length=64), nullable=False),
        sa.Column('label', sa.Integer(), nullable=False),
        sa.Column('box_x', sa.Float(), nullable=True),
        sa.Column('box_y', sa.Float(), nullable=True),
        sa.Column('box_width', sa.Float(), nullable=True),
        sa.Column('box_height', sa.Float(), nullable=True),
        sa.Column('source_sha256', sa.String(length=64), nullable=False),
        sa.Column('line', sa.Integer(), nullable=False),
        sa.Column('imported_at', UTC, nullable=False),
        sa.Column('imported_by', sa.String(length=80), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_ground_truth_labels')),
    )
    op.create_index('ix_ground_truth_labels_study_finding', 'ground_truth_labels',
                    ['study_instance_uid', 'finding'])
    op.create_table(
        'validation_reports',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('model_name', sa.String(length=64), nullable=False),
        sa.Column('weights_sha256', sa.String(length=64), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('generated_at', UTC, nullable=False),
        sa.Column('period_since', UTC, nullable=True),
        sa.Column('period_until', UTC, nullable=True),
        sa.Column('studies', sa.Integer(), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_validation_reports')),
        sa.UniqueConstraint('sha256', name=op.f('uq_validation_reports_sha256')),
    )
    op.create_index(op.f('ix_validation_reports_model_name'), 'validation_reports',
                    ['model_name'])
    op.create_table(
        'operating_points',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('model_name', sa.String(length=64), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('weights_sha256', sa.String(length=64), nullable=False),
        sa.Column('report_sha256', sa.String(length=64), nullable=False),
        sa.Column('thresholds', sa.Text(), nullable=False),
        sa.Column('applied_at', UTC, nullable=False),
        sa.Column('applied_by', sa.String(length=80), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_operating_points')),
        sa.UniqueConstraint('model_name', 'version', name='uq_operating_points_model_name'),
    )
    op.create_table(
        'model_mode_changes',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('model_name', sa.String(length=64), nullable=False),
        sa.Column('mode', sa.String(length=8), nullable=False),
        sa.Column('weights_sha256', sa.String(length=64), nullable=False),
        sa.Column('report_sha256', sa.String(length=64), nullable=True),
        sa.Column('forced', sa.Boolean(), nullable=False),
        sa.Column('changed_at', UTC, nullable=False),
        sa.Column('changed_by', sa.String(length=80), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_model_mode_changes')),
    )
    op.create_index(op.f('ix_model_mode_changes_model_name'), 'model_mode_changes',
                    ['model_name'])
    op.create_table(
        'drift_points',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('model_name', sa.String(length=64), nullable=False),
        sa.Column('computed_at', UTC, nullable=False),
        sa.Column('n_reference', sa.Integer(), nullable=False),
        sa.Column('n_recent', sa.Integer(), nullable=False),
        sa.Column('combined', sa.Float(), nullable=False),
        sa.Column('alarm', sa.Boolean(), nullable=False),
        sa.Column('moved', sa.Text(), nullable=False),
        sa.Column('statistics', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_drift_points')),
    )
    op.create_index(op.f('ix_drift_points_model_name'), 'drift_points', ['model_name'])
    op.create_index(op.f('ix_drift_points_computed_at'), 'drift_points', ['computed_at'])


def downgrade() -> None:
    op.drop_table('drift_points')
    op.drop_table('model_mode_changes')
    op.drop_table('operating_points')
    op.drop_table('validation_reports')
    op.drop_table('ground_truth_labels')
    op.drop_column('analysis_results', 'features')
    op.drop_column('analysis_results', 'mode')
    op.drop_column('analysis_results', 'thresholds_version')
    op.drop_column('jobs', 'mode')
