"""One audit row per ops command run: the run id as a column of its own.

Revision ID: 0002_ops
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_ops"
down_revision = "0001"
branch_labels = None
depends_on = None

SCHEMA = "postroom"


def upgrade() -> None:
    op.add_column(
        "audit",
        sa.Column(
            "run",
            sa.Text,
            nullable=True,
            comment="one row per command run, named by its run id",
        ),
        schema=SCHEMA,
    )
    # Rows written before: one per batch, the run id in details. Keep them as they are.
    op.create_index(
        "uq_audit_run",
        "audit",
        ["run"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text("run IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_audit_run", table_name="audit", schema=SCHEMA)
    op.drop_column("audit", "run", schema=SCHEMA)
