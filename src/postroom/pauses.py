"""Paused consumers: the kill switch every worker obeys within seconds.

A row in ``pauses`` names a consumer whose messages no worker takes. Each worker reads the
table every ``pause_poll_interval`` seconds and, for a paused consumer, lets the handlers
already running finish, then closes that consumer's channel: its unacked messages go back
to its queue, where they wait (nothing is dead-lettered, nothing dropped), and the other
consumers keep flowing. Deleting the row (resume) makes every worker subscribe again.
Pausing and resuming write their audit row in the same transaction as the change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from postroom import audit
from postroom.audit import Action
from postroom.errors import ConfigError
from postroom.tables import pauses, qualified, schema_map

MAX_REASON_CHARS = 500
UNDEFINED_TABLE = "42P01"


@dataclass(frozen=True, slots=True)
class Pause:
    """One paused consumer: why, by whom, since when."""

    consumer: str
    reason: str
    actor: str
    paused_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "reason": self.reason,
            "actor": self.actor,
            "paused_at": self.paused_at.isoformat(),
        }


async def read(db: AsyncConnection | AsyncSession, schema: str) -> dict[str, Pause]:
    """Return the paused consumers by name, read on *db* (a connection or a session).

    Raises ConfigError when the table is missing: the schema is behind head.
    """
    try:
        result = await db.execute(
            select(pauses).order_by(pauses.c.consumer),
            execution_options={"schema_translate_map": schema_map(schema)},
        )
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == UNDEFINED_TABLE:
            raise ConfigError(
                f"schema {schema!r} has no table pauses (it is behind head); "
                "run `postroom migrate`"
            ) from None
        raise
    return {row.consumer: Pause(**row._mapping) for row in result.all()}


async def paused(engine: AsyncEngine, schema: str) -> dict[str, Pause]:
    """Return the paused consumers by name."""
    async with engine.connect() as connection:
        return await read(connection, schema)


async def pause(
    engine: AsyncEngine, schema: str, consumer: str, *, actor: str, reason: str = ""
) -> tuple[Pause, bool]:
    """Pause *consumer*; return its pause and True, or the pause already in force and False.

    Pausing a paused consumer changes nothing and writes no audit row (the first reason
    and actor stay). Workers notice within ``pause_poll_interval`` seconds.
    """
    translate = {"schema_translate_map": schema_map(schema)}
    reason = reason.strip()[:MAX_REASON_CHARS]
    async with async_sessionmaker(engine)() as session, session.begin():
        statement = (
            insert(pauses)
            .values(consumer=consumer, reason=reason, actor=actor)
            .on_conflict_do_nothing(index_elements=["consumer"])
            .returning(*pauses.c)
        )
        row = (await session.execute(statement, execution_options=translate)).first()
        if row is None:
            current = await session.execute(
                select(pauses).where(pauses.c.consumer == consumer), execution_options=translate
            )
            return Pause(**current.one()._mapping), False
        await audit.write(
            session,
            schema=schema,
            actor=actor,
            action=Action.PAUSE,
            target_ids=[],
            count=1,
            details={"consumer": consumer, "reason": reason},
        )
        return Pause(**row._mapping), True


async def resume(engine: AsyncEngine, schema: str, consumer: str, *, actor: str) -> Pause | None:
    """Resume *consumer*; return the pause lifted, or None if it was not paused (no audit)."""
    translate = {"schema_translate_map": schema_map(schema)}
    async with async_sessionmaker(engine)() as session, session.begin():
        statement = delete(pauses).where(pauses.c.consumer == consumer).returning(*pauses.c)
        row = (await session.execute(statement, execution_options=translate)).first()
        if row is None:
            return None
        lifted = Pause(**row._mapping)
        await audit.write(
            session,
            schema=schema,
            actor=actor,
            action=Action.RESUME,
            target_ids=[],
            count=1,
            details={
                "consumer": consumer,
                "paused_by": lifted.actor,
                "paused_at": lifted.paused_at.isoformat(),
                "reason": lifted.reason,
            },
        )
        return lifted


async def known(engine: AsyncEngine, schema: str) -> set[str]:
    """Return the consumers this database has seen: in the inbox, dead letters or pauses.

    The inbox is read with a loose index scan (one index probe per consumer), so this is
    cheap however many rows it holds.
    """
    inbox, letters, paused_ = (qualified(schema, t) for t in ("inbox", "dead_letters", "pauses"))
    sql = text(
        f"""WITH RECURSIVE seen AS (
              (SELECT consumer FROM {inbox} ORDER BY consumer LIMIT 1)
              UNION ALL
              SELECT (SELECT i.consumer FROM {inbox} i WHERE i.consumer > seen.consumer
                      ORDER BY i.consumer LIMIT 1)
              FROM seen WHERE seen.consumer IS NOT NULL)
            SELECT consumer FROM seen WHERE consumer IS NOT NULL
            UNION SELECT DISTINCT consumer FROM {letters}
            UNION SELECT consumer FROM {paused_}"""  # noqa: S608 (validated schema name)
    )
    async with engine.connect() as connection:
        return set((await connection.execute(sql)).scalars())
