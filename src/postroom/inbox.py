"""The inbox: one row per (consumer, message id), written in the handler's transaction.

The primary key makes the second delivery of a message wait for the first one's
transaction and then find the row, so a handler's writes commit at most once.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, exists, func, select
from sqlalchemy.dialects.postgresql import ARRAY, UUID, insert
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from postroom.tables import inbox, schema_map

if TYPE_CHECKING:
    import asyncpg

# Prebuilt: building insert() per message cost more client CPU than executing it.
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
    driver: asyncpg.Connection, *, schema: str, consumer: str, message_id: uuid.UUID
) -> bool:
    """Insert the inbox row; return False if *consumer* already processed *message_id*.

    Must run inside the transaction that performs the handler's writes. *driver* is
    the asyncpg connection under that transaction (see :mod:`postroom.lanes`): the claim
    is a prepared statement in asyncpg's statement cache, one round trip and no
    SQLAlchemy compilation or result wrapping per message.
    """
    return await driver.fetchval(_claim_sql(schema), consumer, message_id) is not None


@functools.cache
def _claim_sql(schema: str) -> str:
    """The claim in asyncpg's dialect for *schema*, compiled once: values stay parameters."""
    dialect = asyncpg_dialect()  # type: ignore[no-untyped-call]
    translate = schema_map(schema)
    if translate is None:
        compiled = _CLAIM.compile(dialect=dialect)
    else:
        compiled = _CLAIM.compile(
            dialect=dialect, schema_translate_map=translate, render_schema_translate=True
        )
    if compiled.positiontup != ["consumer", "message_id"]:  # the order claim() passes them
        raise AssertionError(f"unexpected claim parameters {compiled.positiontup}")
    return compiled.string


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
