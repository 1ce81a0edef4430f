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


def _schema() -> str:
    """The schema being migrated: env.py maps "postroom" to it on the connection.

    Alembic's ALTER TABLE elements do not go through that map (CREATE TABLE does), so
    they are given the real name.
    """
    translate = op.get_bind().get_execution_options().get("schema_translate_map") or {}
    return str(translate.get(SCHEMA, SCHEMA))


def upgrade() -> None:
    schema = _schema()
    op.add_column(
        "audit",
        sa.Column(
            "run",
            sa.Text,
            nullable=True,
            comment="one row per command run, named by its run id",
        ),
        schema=schema,
    )
    # Rows written before: one per batch, the run id in details. Keep them as they are.
    op.create_index(
        "uq_audit_run",
        "audit",
        ["run"],
        unique=True,
        schema=schema,
        postgresql_where=sa.text("run IS NOT NULL"),
    )


def downgrade() -> None:
    schema = _schema()
    op.drop_index("uq_audit_run", table_name="audit", schema=schema)
    op.drop_column("audit", "run", schema=schema)
