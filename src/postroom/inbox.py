"""The inbox: one row per (consumer, message id), written in the handler's transaction.

The primary key makes the second delivery of a message wait for the first one's
transaction and then find the row, so a handler's writes commit at most once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlalchemy import bindparam, exists, func, select
from sqlalchemy.dialects.postgresql import ARRAY, UUID, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from postroom.tables import inbox, schema_map

# Prebuilt: building insert().values() per message cost more client CPU than executing it.
_CLAIM = (
    insert(inbox)
    .values(consumer=bindparam("consumer"), message_id=bindparam("message_id"))
    .on_conflict_do_nothing(index_elements=["consumer", "message_id"])
    .returning(inbox.c.message_id)
)
_CLAIM_MANY = (
    insert(inbox)
    .from_select(
        ["consumer", "message_id"],
        select(
            bindparam("consumer", type_=inbox.c.consumer.type),
            func.unnest(bindparam("message_ids", type_=ARRAY(UUID(as_uuid=True)))),
        ),
    )
    .on_conflict_do_nothing(index_elements=["consumer", "message_id"])
    .returning(inbox.c.message_id)
)


async def claim(
    connection: AsyncConnection, *, schema: str, consumer: str, message_id: uuid.UUID
) -> bool:
    """Insert the inbox row; return False if *consumer* already processed *message_id*.

    Must run inside the transaction that performs the handler's writes.
    """
    result = await connection.execute(
        _CLAIM,
        {"consumer": consumer, "message_id": message_id},
        execution_options={"schema_translate_map": schema_map(schema)},
    )
    return result.first() is not None


async def claim_many(
    connection: AsyncConnection,
    *,
    schema: str,
    consumer: str,
    message_ids: Iterable[uuid.UUID],
) -> set[uuid.UUID]:
    """Claim several messages in one statement; return the ids not processed before.

    Ids are inserted in sorted order, so two batches sharing messages lock their rows in
    the same order and cannot deadlock.
    """
    ids = sorted(set(message_ids))
    if not ids:
        return set()
    result = await connection.execute(
        _CLAIM_MANY,
        {"consumer": consumer, "message_ids": ids},
        execution_options={"schema_translate_map": schema_map(schema)},
    )
    return set(result.scalars())


async def seen(session: AsyncSession, *, schema: str, consumer: str, message_id: uuid.UUID) -> bool:
    """Return True if *consumer* has processed *message_id* (its effect committed)."""
    statement = select(
        exists().where(inbox.c.consumer == consumer, inbox.c.message_id == message_id)
    )
    result = await session.execute(
        statement, execution_options={"schema_translate_map": schema_map(schema)}
    )
    return bool(result.scalar())
