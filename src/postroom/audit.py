"""The audit trail: who changed what through the ops tools, and when.

Every change (replay, purge, un-purge, prune, pause, resume, ...) writes its audit row in the same
transaction as the change it describes, so the trail is exactly as complete as the
changes: a change without its row cannot commit, a rolled-back one leaves neither.

A command run is one row, however many batches it takes: the first batch that changes
something inserts the row, named by the run id; each later batch adds its dead-letter
ids, its count and its line in ``details["batches"]`` to that row, in the batch's own
transaction. ``details["parameters"]`` holds every parameter of the command and
``details["totals"]`` what became of the whole selection (set when the run finishes; a
row without ``finished_at`` is a run that was interrupted).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from postroom.errors import InvalidFilterError, UnknownDeadLetterError
from postroom.tables import audit, dead_letters, schema_map


class Action(enum.StrEnum):
    """What an audit row records."""

    REPLAY = "dead_letters.replay"
    """Dead letters sent back to their consumer's queue (``target_ids``: the dead letters)."""
    EDIT_REPLAY = "dead_letters.edit_replay"
    """One dead letter replayed with an edited body; both bodies are in ``details``."""
    PURGE = "dead_letters.purge"
    """Dead letters given up on; kept as ``purged`` for the retention period."""
    UNPURGE = "dead_letters.unpurge"
    """Purged dead letters restored to ``dead``, within their retention."""
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
    """One audit row: one command run."""

    id: int
    at: datetime
    actor: str
    action: str
    target_ids: tuple[int, ...]
    count: int
    details: Mapping[str, Any]
    run: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "run": self.run,
            "target_ids": list(self.target_ids),
            "count": self.count,
            "details": dict(self.details),
        }


def _translate(schema: str) -> dict[str, Any]:
    return {"schema_translate_map": schema_map(schema)}


async def write(
    session: AsyncSession,
    *,
    schema: str,
    actor: str,
    action: Action,
    target_ids: Sequence[int],
    count: int,
    details: Mapping[str, Any],
    run: str | None = None,
) -> None:
    """Insert one audit row in *session*'s open transaction (the caller commits)."""
    await session.execute(
        insert(audit).values(
            actor=actor,
            action=action.value,
            run=run,
            target_ids=list(target_ids),
            count=count,
            details=dict(details),
        ),
        execution_options=_translate(schema),
    )


async def add_batch(
    session: AsyncSession,
    *,
    schema: str,
    run: str,
    actor: str,
    action: Action,
    target_ids: Sequence[int],
    parameters: Mapping[str, Any],
) -> None:
    """Add one batch of run *run* to its audit row (creating it) in *session*'s transaction."""
    # The ids are in target_ids already: a batch records its time, size and id range only,
    # so the row grows by a few bytes per batch beside the ids themselves.
    batch = {
        "at": datetime.now(UTC).isoformat(),
        "count": len(target_ids),
        "first_id": min(target_ids, default=None),
        "last_id": max(target_ids, default=None),
    }
    row = (
        await session.execute(
            select(audit.c.id, audit.c.details).where(audit.c.run == run).with_for_update(),
            execution_options=_translate(schema),
        )
    ).first()
    if row is None:
        details = {"parameters": dict(parameters), "batches": [batch]}
        await write(
            session,
            schema=schema,
            actor=actor,
            action=action,
            target_ids=target_ids,
            count=len(target_ids),
            details=details,
            run=run,
        )
        return
    details = dict(row.details)
    details["batches"] = [*details.get("batches", []), batch]
    await session.execute(
        update(audit)
        .where(audit.c.id == row.id)
        .values(
            target_ids=audit.c.target_ids + list(target_ids),
            count=audit.c.count + len(target_ids),
            details=details,
        ),
        execution_options=_translate(schema),
    )


async def finish(engine: AsyncEngine, schema: str, run: str, totals: Mapping[str, int]) -> None:
    """Record the totals of a finished run on its audit row (if it changed anything)."""
    async with engine.begin() as connection:
        row = (
            await connection.execute(
                select(audit.c.id, audit.c.details).where(audit.c.run == run).with_for_update(),
                execution_options=_translate(schema),
            )
        ).first()
        if row is None:
            return
        details = {
            **row.details,
            "totals": dict(totals),
            "finished_at": datetime.now(UTC).isoformat(),
        }
        await connection.execute(
            update(audit).where(audit.c.id == row.id).values(details=details),
            execution_options=_translate(schema),
        )


async def entries(
    engine: AsyncEngine,
    schema: str,
    *,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    target: int | None = None,
    run: str | None = None,
    message_id: str | None = None,
    limit: int = 50,
) -> list[AuditEntry]:
    """Return audit rows, newest first, narrowed by the given criteria.

    *target* (a dead-letter id) and *message_id* follow the message's whole chain: the
    rows naming any dead letter it became, across its replays. *run* matches a run id or
    its first characters (as tables show them). An id, message id or run that names
    nothing at all is an error (UnknownDeadLetterError, InvalidFilterError), not an
    empty answer.
    """
    if action is not None and action not in {a.value for a in Action}:
        known = ", ".join(a.value for a in Action)
        raise InvalidFilterError(f"unknown action {action!r}; known: {known}")
    query = select(audit).order_by(audit.c.id.desc()).limit(limit)
    if action is not None:
        query = query.where(audit.c.action == action)
    if actor is not None:
        query = query.where(audit.c.actor == actor)
    if since is not None:
        query = query.where(audit.c.at >= since)
    async with engine.connect() as connection:
        if target is not None or message_id is not None:
            ids = await _chain_ids(connection, schema, target, message_id)
            query = query.where(audit.c.target_ids.overlap(ids))
        if run is not None:
            prefix = run.strip().lower().replace("%", "").replace("_", "")
            if len(prefix) < 4:
                raise InvalidFilterError(f"--run {run!r}: give at least 4 characters of a run id")
            query = query.where(audit.c.run.like(prefix + "%"))
            found = await connection.scalar(
                select(func.count()).where(audit.c.run.like(prefix + "%")),
                execution_options=_translate(schema),
            )
            if not found:
                raise InvalidFilterError(f"no audit row for run {run!r}")
        result = await connection.execute(query, execution_options=_translate(schema))
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
            run=row["run"],
        )
        for row in rows
    ]


async def _chain_ids(
    connection: Any, schema: str, target: int | None, message_id: str | None
) -> list[int]:
    """The ids of every dead letter in the chain of *target* or of *message_id*."""
    c = dead_letters.c
    ids: set[int] = set()
    if target is not None:
        ids.add(target)
        origin = (
            await connection.execute(
                select(c.consumer, c.message_id).where(c.id == target),
                execution_options=_translate(schema),
            )
        ).first()
        if origin is None:
            named = await connection.scalar(
                select(func.count()).where(audit.c.target_ids.contains([target])),
                execution_options=_translate(schema),
            )
            if not named:  # neither a dead letter nor one that was pruned after a change
                raise UnknownDeadLetterError([target])
        else:
            hops = select(c.id).where(
                c.consumer == origin.consumer, c.message_id == origin.message_id
            )
            ids |= set(
                (await connection.execute(hops, execution_options=_translate(schema))).scalars()
            )
    if message_id is not None:
        hops = select(c.id).where(c.message_id == message_id.strip())
        found = set(
            (await connection.execute(hops, execution_options=_translate(schema))).scalars()
        )
        if not found:
            raise InvalidFilterError(f"no dead letter with message id {message_id!r}")
        ids = found if target is None else ids & found
    return sorted(ids)
