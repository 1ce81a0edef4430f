"""postroom's tables, as SQLAlchemy Core metadata.

The tables live in their own schema (``postroom`` by default; another name is applied
with :func:`schema_map`) so a service's own tables and migrations never collide with
ours. The Alembic migrations under ``migrations/`` create exactly these; a test keeps
the two from drifting apart.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

DEFAULT_SCHEMA = "postroom"
VERSION_TABLE = "postroom_alembic_version"

metadata = MetaData(schema=DEFAULT_SCHEMA)

_now = text("now()")

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("message_id", UUID(as_uuid=True), nullable=False),
    Column("topic", Text, nullable=False),
    Column("ordering_key", Text, nullable=True, comment="rows of one key are relayed in order"),
    Column("exchange", Text, nullable=True, comment="NULL: the configured events exchange"),
    Column("routing_key", Text, nullable=False),
    Column("headers", JSONB, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("correlation_id", Text, nullable=True),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("available_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    Index("ix_outbox_available_at", "available_at"),
    Index(
        "ix_outbox_ordering_key",
        "ordering_key",
        "id",
        postgresql_where=text("ordering_key IS NOT NULL"),
    ),
)

inbox = Table(
    "inbox",
    metadata,
    Column("consumer", Text, nullable=False),
    Column("message_id", UUID(as_uuid=True), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=_now),
    PrimaryKeyConstraint("consumer", "message_id", name="pk_inbox"),
    Index("ix_inbox_processed_at", "processed_at"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("consumer", Text, nullable=False),
    Column(
        "message_id", Text, nullable=False, comment="text: undecodable messages may lack a UUID"
    ),
    Column("topic", Text, nullable=True),
    Column("reason", Text, nullable=False),
    Column("error_type", Text, nullable=False),
    Column("error_message", Text, nullable=False),
    Column("traceback", Text, nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("first_failed_at", DateTime(timezone=True), nullable=False),
    Column("last_failed_at", DateTime(timezone=True), nullable=False),
    Column("headers", JSONB, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("content_type", Text, nullable=True),
    Column("correlation_id", Text, nullable=True),
    Column("status", Text, nullable=False, server_default=text("'dead'")),
    Column("replays", Integer, nullable=False, server_default=text("0")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Index(
        "uq_dead_letters_live",
        "consumer",
        "message_id",
        unique=True,
        postgresql_where=text("status = 'dead'"),
    ),
    Index("ix_dead_letters_created_at", "created_at"),
    Index("ix_dead_letters_status_updated_at", "status", "updated_at"),
)

audit = Table(
    "audit",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("target_ids", ARRAY(BigInteger), nullable=False),
    Column("count", Integer, nullable=False),
    Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("run", Text, nullable=True, comment="one row per command run, named by its run id"),
    Index("uq_audit_run", "run", unique=True, postgresql_where=text("run IS NOT NULL")),
)

pauses = Table(
    "pauses",
    metadata,
    Column("consumer", Text, primary_key=True),
    Column("reason", Text, nullable=False, server_default=text("''")),
    Column("actor", Text, nullable=False),
    Column("paused_at", DateTime(timezone=True), nullable=False, server_default=_now),
)


def schema_map(schema: str) -> dict[str | None, str] | None:
    """Return the ``schema_translate_map`` execution option for *schema*, if needed."""
    return None if schema == DEFAULT_SCHEMA else {DEFAULT_SCHEMA: schema}


def qualified(schema: str, table: str) -> str:
    """Return ``"schema"."table"`` for hand-written SQL; *schema* is validated by Settings."""
    return f'"{schema}"."{table}"'
