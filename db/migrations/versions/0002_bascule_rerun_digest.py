"""bascule_jobs.rerun_digest: what a rerun compares to answer without the database layer

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 15:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("bascule_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rerun_digest", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("bascule_jobs", schema=None) as batch_op:
        batch_op.drop_column("rerun_digest")
