"""The inbox: one row per (consumer, message id), written in the handler's transaction.

The primary key makes the second delivery of a message wait for the first one's
transaction and then find the row, so a handler's writes commit at most once.
"""

from __future__ import annotations

import uuid

from sqlalchemy import exists, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from postroom.tables import inbox, schema_map


async def claim(
    session: AsyncSession, *, schema: str, consumer: str, message_id: uuid.UUID
) -> bool:
    """Insert the inbox row; return False if *consumer* already processed *message_id*.

    Must run inside the transaction that performs the handler's writes.
    """
    statement = (
        insert(inbox)
        .values(consumer=consumer, message_id=message_id)
        .on_conflict_do_nothing(index_elements=["consumer", "message_id"])
        .returning(inbox.c.message_id)
    )
    result = await session.execute(
        statement, execution_options={"schema_translate_map": schema_map(schema)}
    )
    return result.first() is not None


async def seen(session: AsyncSession, *, schema: str, consumer: str, message_id: uuid.UUID) -> bool:
    """Return True if *consumer* has processed *message_id* (its effect committed)."""
    statement = select(
        exists().where(inbox.c.consumer == consumer, inbox.c.message_id == message_id)
    )
    result = await session.execute(
        statement, execution_options={"schema_translate_map": schema_map(schema)}
    )
    return bool(result.scalar())
