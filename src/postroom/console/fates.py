"""What became of replayed messages, and one message's chain of dead letters. Read-only.

A replayed dead letter's message keeps its message id, so its fate is read from the rows
it leaves: an inbox row of its consumer means it was **handled**; a later dead letter of
the same consumer and message id means it **failed again**; neither means it is still
**pending** (in the outbox or the queue, or paused).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from postroom.tables import qualified

_UUID = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class FateKind(enum.StrEnum):
    """Where a replayed message stands now."""

    HANDLED = "handled"
    """Its consumer committed it (an inbox row exists)."""
    FAILED_AGAIN = "failed again"
    """It became a dead letter again (see ``again_id``)."""
    PENDING = "pending"
    """Neither yet: waiting in the outbox or the queue."""


@dataclass(frozen=True, slots=True)
class Fate:
    """One dead letter's message, as it stands now."""

    id: int
    consumer: str
    message_id: str
    status: str
    kind: FateKind
    handled_at: datetime | None
    again_id: int | None


@dataclass(frozen=True, slots=True)
class Link:
    """One dead letter in a message's chain (oldest first)."""

    id: int
    consumer: str
    status: str
    replays: int
    error_type: str
    error_message: str
    created_at: datetime


async def fates(engine: AsyncEngine, schema: str, ids: Sequence[int]) -> list[Fate]:
    """Return the fate of the messages of dead letters *ids*, by id."""
    if not ids:
        return []
    letters, inbox = qualified(schema, "dead_letters"), qualified(schema, "inbox")
    sql = text(
        f"""SELECT d.id, d.consumer, d.message_id, d.status,
              (SELECT i.processed_at FROM {inbox} i
                WHERE i.consumer = d.consumer AND d.message_id ~ :uuid
                  AND i.message_id = CASE WHEN d.message_id ~ :uuid
                                          THEN d.message_id::uuid END) AS handled_at,
              (SELECT min(n.id) FROM {letters} n
                WHERE n.consumer = d.consumer AND n.message_id = d.message_id
                  AND n.id > d.id) AS again_id
            FROM {letters} d WHERE d.id = ANY(:ids) ORDER BY d.id"""  # noqa: S608 (schema validated)
    )
    async with engine.connect() as connection:
        rows = (await connection.execute(sql, {"ids": list(ids), "uuid": _UUID})).all()
    found = []
    for row in rows:
        if row.again_id is not None:
            kind = FateKind.FAILED_AGAIN
        elif row.handled_at is not None:
            kind = FateKind.HANDLED
        else:
            kind = FateKind.PENDING
        found.append(
            Fate(
                row.id, row.consumer, row.message_id, row.status, kind, row.handled_at, row.again_id
            )
        )
    return found


async def chain(
    engine: AsyncEngine, schema: str, consumer: str, message_id: str, *, limit: int = 50
) -> list[Link]:
    """Return the dead letters of one message at one consumer, oldest first: its replays."""
    letters = qualified(schema, "dead_letters")
    sql = text(
        f"""SELECT id, consumer, status, replays, error_type, error_message, created_at
            FROM {letters} WHERE consumer = :consumer AND message_id = :message_id
            ORDER BY id LIMIT :limit"""  # noqa: S608 (schema validated)
    )
    params = {"consumer": consumer, "message_id": message_id, "limit": limit}
    async with engine.connect() as connection:
        rows = (await connection.execute(sql, params)).all()
    return [Link(**row._mapping) for row in rows]
