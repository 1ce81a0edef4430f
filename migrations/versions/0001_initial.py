"""postroom's initial tables: outbox, inbox, dead_letters, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Tables are created in schema "postroom"; env.py maps it to the configured schema.
SCHEMA = "postroom"
NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("message_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column(
            "ordering_key",
            sa.Text,
            nullable=True,
            comment="rows of one key are relayed in order",
        ),
        sa.Column(
            "exchange", sa.Text, nullable=True, comment="NULL: the configured events exchange"
        ),
        sa.Column("routing_key", sa.Text, nullable=False),
        sa.Column("headers", postgresql.JSONB, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("correlation_id", sa.Text, nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text, nullable=True),
        schema=SCHEMA,
    )
    op.create_index("ix_outbox_available_at", "outbox", ["available_at"], schema=SCHEMA)
    op.create_index(
        "ix_outbox_ordering_key",
        "outbox",
        ["ordering_key", "id"],
        schema=SCHEMA,
        postgresql_where=sa.text("ordering_key IS NOT NULL"),
    )

    op.create_table(
        "inbox",
        sa.Column("consumer", sa.Text, nullable=False),
        sa.Column("message_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("consumer", "message_id", name="pk_inbox"),
        schema=SCHEMA,
    )
    op.create_index("ix_inbox_processed_at", "inbox", ["processed_at"], schema=SCHEMA)

    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("consumer", sa.Text, nullable=False),
        sa.Column(
            "message_id",
            sa.Text,
            nullable=False,
            comment="text: undecodable messages may lack a UUID",
        ),
        sa.Column("topic", sa.Text, nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("error_type", sa.Text, nullable=False),
        sa.Column("error_message", sa.Text, nullable=False),
        sa.Column("traceback", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("headers", postgresql.JSONB, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("content_type", sa.Text, nullable=True),
        sa.Column("correlation_id", sa.Text, nullable=True),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'dead'")),
        sa.Column("replays", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        schema=SCHEMA,
    )
    op.create_index(
        "uq_dead_letters_live",
        "dead_letters",
        ["consumer", "message_id"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'dead'"),
    )
    op.create_index("ix_dead_letters_created_at", "dead_letters", ["created_at"], schema=SCHEMA)
    op.create_index(
        "ix_dead_letters_status_updated_at",
        "dead_letters",
        ["status", "updated_at"],
        schema=SCHEMA,
    )

    op.create_table(
        "audit",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("target_ids", postgresql.ARRAY(sa.BigInteger), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column(
            "details",
            postgresql.JSONB,
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        schema=SCHEMA,
    )


def downgrade() -> None:
    for table in ("audit", "dead_letters", "inbox", "outbox"):
        op.drop_table(table, schema=SCHEMA)
