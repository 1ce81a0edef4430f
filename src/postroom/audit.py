"""The audit trail: who changed what through the ops tools, and when.

Every mutating ops action (replay, purge, prune, pause, resume) writes its audit row in the same
transaction as the change it describes, so the trail is exactly as complete as the
changes: a change without its row cannot commit, a rolled-back one leaves neither.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from postroom.tables import audit, schema_map


class Action(enum.StrEnum):
    """What an audit row records."""

    REPLAY = "dead_letters.replay"
    """Dead letters sent back to their consumer's queue (``target_ids``: the dead letters)."""
    PURGE = "dead_letters.purge"
    """Dead letters given up on; kept as ``purged`` for the retention period."""
    PRUNE = "prune"
    """Old inbox rows and resolved dead letters deleted (counts in ``details``)."""
    OUTBOX_RETRY = "outbox.retry"
    """Outbox rows made due now (``target_ids``: the outbox row ids)."""
    OUTBOX_DISCARD = "outbox.discard"
    """Outbox rows deleted on purpose, never sent (``details.rows``: which events)."""
    PAUSE = "consumers.pause"
    """A consumer paused: no worker takes its messages (``details``: consumer, reason)."""
    RESUME = "consumers.resume"
    """A paused consumer resumed (``details``: consumer, the pause's reason and actor)."""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit row."""

    id: int
    at: datetime
    actor: str
    action: str
    target_ids: tuple[int, ...]
    count: int
    details: Mapping[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "target_ids": list(self.target_ids),
            "count": self.count,
            "details": dict(self.details),
        }


async def write(
    session: AsyncSession,
    *,
    schema: str,
    actor: str,
    action: Action,
    target_ids: Sequence[int],
    count: int,
    details: Mapping[str, Any],
) -> None:
    """Insert one audit row in *session*'s open transaction (the caller commits)."""
    await session.execute(
        insert(audit).values(
            actor=actor,
            action=action.value,
            target_ids=list(target_ids),
            count=count,
            details=dict(details),
        ),
        execution_options={"schema_translate_map": schema_map(schema)},
    )


async def entries(
    engine: AsyncEngine,
    schema: str,
    *,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    target: int | None = None,
    limit: int = 50,
) -> list[AuditEntry]:
    """Return audit rows, newest first, narrowed by the given criteria.

    *target* keeps the rows naming that dead-letter id, to trace one dead letter's history.
    """
    query = select(audit).order_by(audit.c.id.desc()).limit(limit)
    if action is not None:
        query = query.where(audit.c.action == action)
    if actor is not None:
        query = query.where(audit.c.actor == actor)
    if since is not None:
        query = query.where(audit.c.at >= since)
    if target is not None:
        query = query.where(audit.c.target_ids.contains([target]))
    async with engine.connect() as connection:
        result = await connection.execute(
            query, execution_options={"schema_translate_map": schema_map(schema)}
        )
        rows = result.mappings().all()
    return [
        AuditEntry(
            id=row["id"],
            at=row["at"],
            actor=row["actor"],
            action=row["action"],
            target_ids=tuple(row["target_ids"]),
            count=row["count"],
            details=row["details"],
        )
        for row in rows
    ]
