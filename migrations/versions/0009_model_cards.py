"""bring your own model: each result records its model card's SHA-256 and the runtime

Added with ALTER TABLE only; results before this revision have NULL (the catalogue's models,
on torch).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('analysis_results',
                  sa.Column('card_sha256', sa.String(length=64), nullable=True))
    op.add_column('analysis_results', sa.Column('runtime', sa.String(length=16), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+): a batch copy of analysis_results would
    # trip the findings table's foreign key.
    op.drop_column('analysis_results', 'runtime')
    op.drop_column('analysis_results', 'card_sha256')
