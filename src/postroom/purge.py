"""Purge dead letters (give up on them) and un-purge them (change your mind).

A purge marks dead letters ``purged``: they stay in the table, out of the way, until
``prune`` deletes them once ``dead_letter_retention_days`` have passed. Within that
retention :func:`unpurge` puts them back to ``dead``, waiting for a person again. Both
are runs (:mod:`postroom.runs`): batched, resumable, one audit row per command. A purge
always needs a confirmation (or a dry run): without one it raises
ConfirmationNeededError saying how many it would purge.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from postroom.audit import Action
from postroom.deadletters import DeadStatus
from postroom.filters import Filters
from postroom.runs import (
    Item,
    Plan,
    Progress,
    Report,
    Verdict,
    ask_first,
    execute,
    item_of,
    mark,
)
from postroom.tables import dead_letters, schema_map

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

    from postroom.router import Router


async def purge(
    engine: AsyncEngine,
    schema: str,
    filters: Filters,
    *,
    actor: str,
    confirm: bool = False,
    dry_run: bool = False,
    limit: int | None = None,
    batch_size: int = 500,
    progress: Progress | None = None,
    router: Router | None = None,
) -> Report:
    """Mark the dead letters matching *filters* purged; prune deletes them after retention.

    Needs *confirm* (or *dry_run*, which reports and changes nothing): without it,
    ConfirmationNeededError with the preview. Raises like :func:`postroom.replay.replay`
    before changing anything.
    """

    async def judge(session: AsyncSession, rows: list[Any]) -> list[tuple[Item, Any]]:
        return [(item_of(row, Verdict.PURGED), True) for row in rows]

    async def apply(session: AsyncSession, acted: list[tuple[Any, Any]]) -> None:
        await mark(session, [row.id for row, _ in acted], DeadStatus.PURGED, schema)

    parameters = {"filters": filters.as_json(), "limit": limit, "batch_size": batch_size}
    plan = Plan(Action.PURGE, DeadStatus.DEAD, judge, apply, parameters)
    if not (confirm or dry_run):
        await ask_first(
            engine,
            schema,
            filters,
            plan,
            why="a purge always asks",
            actor=actor,
            limit=limit,
            router=router,
        )
    return await execute(
        engine,
        schema,
        filters,
        plan,
        run=str(uuid.uuid4()),
        actor=actor,
        dry_run=dry_run,
        limit=limit,
        batch_size=batch_size,
        progress=progress,
        router=router,
    )


async def unpurge(
    engine: AsyncEngine,
    schema: str,
    filters: Filters,
    *,
    actor: str,
    retention: timedelta | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    batch_size: int = 500,
    progress: Progress | None = None,
    router: Router | None = None,
) -> Report:
    """Put the purged dead letters matching *filters* back to ``dead``.

    One purged longer ago than *retention* is refused (prune deletes it, or already
    did); so is one whose message is dead again under a newer dead letter (only one dead
    letter per consumer and message can be live: replay or purge that one).
    """

    async def judge(session: AsyncSession, rows: list[Any]) -> list[tuple[Item, Any]]:
        c = dead_letters.c
        live = set()
        if rows:
            query = select(c.consumer, c.message_id).where(
                c.status == DeadStatus.DEAD.value,
                c.message_id.in_([row.message_id for row in rows]),
            )
            found = await session.execute(query, execution_options=translate)
            live = {(r.consumer, r.message_id) for r in found}
        now = datetime.now(UTC)
        judged: list[tuple[Item, Any]] = []
        for row in rows:
            if retention is not None and row.updated_at < now - retention:
                detail = f"purged {row.updated_at:%Y-%m-%d %H:%M} UTC, past its retention"
                judged.append((item_of(row, Verdict.REFUSED, detail), None))
            elif (row.consumer, row.message_id) in live:
                detail = "its message is dead again under a newer dead letter"
                judged.append((item_of(row, Verdict.REFUSED, detail), None))
            else:
                live.add((row.consumer, row.message_id))
                judged.append((item_of(row, Verdict.RESTORED), True))
        return judged

    async def apply(session: AsyncSession, acted: list[tuple[Any, Any]]) -> None:
        await mark(session, [row.id for row, _ in acted], DeadStatus.DEAD, schema)

    translate = {"schema_translate_map": schema_map(schema)}
    parameters = {
        "filters": filters.as_json(),
        "limit": limit,
        "batch_size": batch_size,
        "retention_days": None if retention is None else retention.total_seconds() / 86400,
    }
    plan = Plan(Action.UNPURGE, DeadStatus.PURGED, judge, apply, parameters)
    return await execute(
        engine,
        schema,
        filters,
        plan,
        run=str(uuid.uuid4()),
        actor=actor,
        dry_run=dry_run,
        limit=limit,
        batch_size=batch_size,
        progress=progress,
        router=router,
    )
