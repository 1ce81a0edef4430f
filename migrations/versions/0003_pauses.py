"""Paused consumers: one row per consumer that every worker must stop taking messages for.

Revision ID: 0003_pauses
Revises: 0002_ops
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_pauses"
down_revision = "0002_ops"
branch_labels = None
depends_on = None

SCHEMA = "postroom"  # env.py maps it to the configured schema


def upgrade() -> None:
    op.create_table(
        "pauses",
        sa.Column("consumer", sa.Text, primary_key=True),
        sa.Column("reason", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column(
            "paused_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")
        ),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("pauses", schema=SCHEMA)
