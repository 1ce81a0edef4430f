"""Prune the rows postroom no longer needs, and vacuum the tables that churn.

``prune`` deletes, in small batches, each a short transaction of its own:

- inbox rows older than the dedupe window (``inbox_retention_days``). After that, a
  redelivered copy of the message would run its handler again, so keep the window longer
  than any redelivery or replay you expect;
- dead letters replayed or purged longer ago than ``dead_letter_retention_days``.

Live dead letters (status ``dead``) are never pruned: they wait for a person. The outbox
needs no pruning: the relay deletes rows as it publishes them.

A batch locks only the rows it deletes and skips rows locked by others; every statement
runs with a short ``lock_timeout``, so a prune never queues behind a table lock (say a
migration's), which would stall the relays and workers queued behind it: it retries a
few times, then gives up with TableBusyError. Running it beside relays and workers is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, Table, delete, func, select, tuple_
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker

from postroom import audit
from postroom.audit import Action
from postroom.deadletters import DeadStatus
from postroom.errors import TableBusyError
from postroom.tables import dead_letters, inbox, qualified, schema_map

LOCK_NOT_AVAILABLE = "55P03"
BUSY_RETRIES = 3

PruneProgress = Callable[[str, int, int], None]
"""Called with (table, rows deleted so far, rows to delete) after each batch."""


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What a prune deleted (in a dry run: would delete) and its cut-off times."""

    dry_run: bool
    inbox: int
    dead_letters: int
    inbox_before: datetime
    dead_letters_before: datetime

    def as_json(self) -> dict[str, Any]:
        shown = asdict(self)
        shown["inbox_before"] = self.inbox_before.isoformat()
        shown["dead_letters_before"] = self.dead_letters_before.isoformat()
        return shown


async def prune(
    engine: AsyncEngine,
    schema: str,
    *,
    inbox_retention: timedelta,
    dead_letter_retention: timedelta,
    actor: str,
    dry_run: bool = False,
    batch_size: int = 1000,
    lock_timeout: timedelta = timedelta(seconds=2),
    progress: PruneProgress | None = None,
) -> PruneReport:
    """Delete inbox rows and resolved dead letters past their retention, batch by batch.

    The cut-offs are fixed when it starts, so it finishes however busy the tables are.
    One audit row records the counts when it ends (also when it fails midway having
    deleted something; a killed prune leaves none: it deletes only expired rows). Raises
    TableBusyError when a table stays locked past *lock_timeout* (rows deleted so far
    stay deleted; run it again later).
    """
    translate = {"schema_translate_map": schema_map(schema)}
    async with engine.connect() as connection:
        now = await connection.scalar(select(func.now()))
    assert isinstance(now, datetime)
    cutoffs = {"inbox": now - inbox_retention, "dead_letters": now - dead_letter_retention}
    counts = {"inbox": 0, "dead_letters": 0}

    def report() -> PruneReport:
        return PruneReport(
            dry_run=dry_run,
            inbox=counts["inbox"],
            dead_letters=counts["dead_letters"],
            inbox_before=cutoffs["inbox"],
            dead_letters_before=cutoffs["dead_letters"],
        )

    resolved = dead_letters.c.status.in_([DeadStatus.REPLAYED.value, DeadStatus.PURGED.value])
    plans: list[tuple[str, Table, list[Any], list[Any]]] = [
        (
            "inbox",
            inbox,
            [inbox.c.consumer, inbox.c.message_id],
            [inbox.c.processed_at < cutoffs["inbox"]],
        ),
        (
            "dead_letters",
            dead_letters,
            [dead_letters.c.id],
            [resolved, dead_letters.c.updated_at < cutoffs["dead_letters"]],
        ),
    ]
    try:
        for name, table, key, old in plans:
            count = select(func.count()).select_from(table).where(*old)
            total = await _guarded(engine, count, translate, lock_timeout, name)
            if dry_run:
                counts[name] = total
                continue
            doomed = select(*key).where(*old).limit(batch_size).with_for_update(skip_locked=True)
            statement = delete(table).where(tuple_(*key).in_(doomed))
            while True:
                rows = await _guarded(engine, statement, translate, lock_timeout, name)
                counts[name] += rows
                if progress:
                    progress(name, counts[name], max(total, counts[name]))
                if rows < batch_size:
                    break
    except BaseException:
        if not dry_run and any(counts.values()):
            # Record what was deleted before the failure; the failure itself is re-raised.
            with contextlib.suppress(Exception):
                await _audit(engine, schema, actor, report(), batch_size)
        raise
    if not dry_run:
        await _audit(engine, schema, actor, report(), batch_size)
    return report()


# The tables whose rows come and go all day: their dead tuples must be vacuumed away.
CHURNING_TABLES = ("outbox", "inbox", "dead_letters")


async def vacuum(engine: AsyncEngine, schema: str) -> list[str]:
    """VACUUM (ANALYZE) the tables whose rows churn; return their qualified names.

    Autovacuum does this by itself; this is for servers where it is off or lags (the
    relay deletes every row it publishes, so the outbox is all dead tuples otherwise).
    VACUUM cannot run in a transaction, hence the AUTOCOMMIT connection.
    """
    names = [qualified(schema, table) for table in CHURNING_TABLES]
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        for name in names:
            await autocommit.exec_driver_sql(f"VACUUM (ANALYZE) {name}")
    return names


async def _guarded(
    engine: AsyncEngine, statement: Any, translate: dict[str, Any], timeout: timedelta, name: str
) -> int:
    """Run *statement* in a short transaction, waiting at most *timeout* for any lock.

    Returns a SELECT's scalar or a DELETE's row count. A lock still held after a few
    tries raises TableBusyError.
    """
    for attempt in range(1, BUSY_RETRIES + 1):
        try:
            async with engine.begin() as connection:
                await _limit_waits(connection, timeout)
                result = await connection.execute(statement, execution_options=translate)
                if isinstance(statement, Select):
                    return int(result.scalar() or 0)
                return int(result.rowcount)
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            if attempt == BUSY_RETRIES:
                raise TableBusyError(
                    f"{name} stayed locked by another session for {BUSY_RETRIES} tries of "
                    f"{timeout.total_seconds():g}s (a migration or a manual LOCK?); "
                    "rows deleted so far stay deleted, run prune again later"
                ) from None
            await asyncio.sleep(timeout.total_seconds())
    raise AssertionError("unreachable")


async def _limit_waits(connection: AsyncConnection, timeout: timedelta) -> None:
    millis = str(max(1, int(timeout.total_seconds() * 1000)))
    await connection.execute(
        select(func.set_config("lock_timeout", millis, True)),
    )


async def _audit(
    engine: AsyncEngine, schema: str, actor: str, report: PruneReport, batch_size: int
) -> None:
    sessions = async_sessionmaker(engine)
    async with sessions() as session, session.begin():
        await audit.write(
            session,
            schema=schema,
            actor=actor,
            action=Action.PRUNE,
            target_ids=[],
            count=report.inbox + report.dead_letters,
            details={
                "inbox": report.inbox,
                "dead_letters": report.dead_letters,
                "inbox_before": report.inbox_before.isoformat(),
                "dead_letters_before": report.dead_letters_before.isoformat(),
                "batch_size": batch_size,
            },
        )
