"""Pending outbox rows a person looks at and acts on: list, show, retry now, discard.

The relay never drops an event it could not publish (docs/operations.md): it retries
with a growing delay. These functions let a person see such rows and decide: try them
again now (after deploying the missing consumer), or discard them on purpose. A retry
or a discard changes rows and writes an audit row in one transaction per batch; a
discard's audit row keeps each discarded row's id, message id, topic and routing key.
A dry run reads only.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from postroom import audit
from postroom.audit import Action
from postroom.errors import PostroomError
from postroom.tables import outbox, schema_map

KINDS = ("event", "direct")
"""event: published to the events exchange; direct: a retry or replay for one consumer."""


@dataclass(frozen=True, slots=True)
class RowFilters:
    """Which outbox rows a command means; every criterion given must match."""

    ids: tuple[int, ...] = ()
    topic: str | None = None
    routing_key: str | None = None
    kind: str | None = None
    errored: bool = False
    text: str | None = None
    older_than: datetime | None = None
    every: bool = False
    """Select every row when no other criterion is given (``--all``)."""

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise PostroomError(f"unknown kind {self.kind!r}; one of {', '.join(KINDS)}")

    @property
    def empty(self) -> bool:
        """True if nothing was selected: no criterion and not ``every``."""
        return self == RowFilters()

    def where(self) -> list[ColumnElement[bool]]:
        c = outbox.c
        clauses: list[ColumnElement[bool]] = []
        if self.ids:
            clauses.append(c.id.in_(self.ids))
        if self.topic is not None:
            clauses.append(c.topic == self.topic)
        if self.routing_key is not None:
            clauses.append(c.routing_key == self.routing_key)
        if self.kind == "event":
            clauses.append(c.exchange.is_(None))
        elif self.kind == "direct":
            clauses.append(c.exchange.is_not(None))
        if self.errored:
            clauses.append(c.last_error.is_not(None))
        if self.text is not None:
            clauses.append(c.last_error.contains(self.text, autoescape=True))
        if self.older_than is not None:
            clauses.append(c.created_at < self.older_than)
        return clauses

    def as_json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "topic": self.topic,
            "routing_key": self.routing_key,
            "kind": self.kind,
            "errored": self.errored or None,
            "text": self.text,
            "older_than": self.older_than.isoformat() if self.older_than else None,
        }
        return {key: value for key, value in shown.items() if value is not None}


@dataclass(frozen=True, slots=True)
class PendingRow:
    """One outbox row as a person sees it."""

    id: int
    message_id: str
    topic: str
    kind: str
    routing_key: str
    created_at: datetime
    available_at: datetime
    attempts: int
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "message_id": self.message_id,
            "topic": self.topic,
            "kind": self.kind,
            "routing_key": self.routing_key,
            "created_at": self.created_at.isoformat(),
            "available_at": self.available_at.isoformat(),
            "attempts": self.attempts,
            "last_error": self.last_error,
        }


_COLUMNS = (
    outbox.c.id,
    outbox.c.message_id,
    outbox.c.topic,
    outbox.c.exchange,
    outbox.c.routing_key,
    outbox.c.created_at,
    outbox.c.available_at,
    outbox.c.attempts,
    outbox.c.last_error,
)


def _row(row: Any) -> PendingRow:
    return PendingRow(
        id=row.id,
        message_id=str(row.message_id),
        topic=row.topic,
        kind="event" if row.exchange is None else "direct",
        routing_key=row.routing_key,
        created_at=row.created_at,
        available_at=row.available_at,
        attempts=row.attempts,
        last_error=row.last_error,
    )


async def rows(
    engine: AsyncEngine, schema: str, filters: RowFilters, *, limit: int | None = 50
) -> list[PendingRow]:
    """Return the matching rows, oldest first (the ones waiting longest)."""
    query: Select[Any] = select(*_COLUMNS).where(*filters.where()).order_by(outbox.c.id)
    if limit is not None:
        query = query.limit(limit)
    async with engine.connect() as connection:
        result = await connection.execute(
            query, execution_options={"schema_translate_map": schema_map(schema)}
        )
        return [_row(r) for r in result.all()]


async def show(engine: AsyncEngine, schema: str, row_id: int) -> dict[str, Any] | None:
    """Return everything about one row (headers and body included), or None if it is gone."""
    async with engine.connect() as connection:
        result = await connection.execute(
            select(outbox).where(outbox.c.id == row_id),
            execution_options={"schema_translate_map": schema_map(schema)},
        )
        row = result.one_or_none()
    if row is None:
        return None
    shown = _row(row).as_json()
    shown.update(
        exchange=row.exchange,
        ordering_key=row.ordering_key,
        headers=row.headers,
        content_type=row.content_type,
        correlation_id=row.correlation_id,
        occurred_at=row.occurred_at.isoformat(),
        body=bytes(row.body),
    )
    return shown


async def count(engine: AsyncEngine, schema: str, filters: RowFilters) -> int:
    """Return how many rows match, for a confirmation prompt."""
    async with engine.connect() as connection:
        value = await connection.scalar(
            select(func.count()).select_from(outbox).where(*filters.where()),
            execution_options={"schema_translate_map": schema_map(schema)},
        )
    return int(value or 0)


@dataclass(frozen=True, slots=True)
class Change:
    """What a retry or discard did (in a dry run: would do)."""

    action: Action
    dry_run: bool
    run: str
    rows: tuple[PendingRow, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "dry_run": self.dry_run,
            "run": self.run,
            "count": len(self.rows),
            "rows": [row.as_json() for row in self.rows],
        }


async def retry(
    engine: AsyncEngine,
    schema: str,
    filters: RowFilters,
    *,
    actor: str,
    dry_run: bool = False,
    batch_size: int = 500,
) -> Change:
    """Make the matching rows due now, so the relay tries them at its next claim."""
    return await _change(engine, schema, filters, Action.OUTBOX_RETRY, actor, dry_run, batch_size)


async def discard(
    engine: AsyncEngine,
    schema: str,
    filters: RowFilters,
    *,
    actor: str,
    dry_run: bool = False,
    batch_size: int = 500,
) -> Change:
    """Delete the matching rows on purpose: their events are never sent. Audited per batch."""
    return await _change(engine, schema, filters, Action.OUTBOX_DISCARD, actor, dry_run, batch_size)


async def _change(
    engine: AsyncEngine,
    schema: str,
    filters: RowFilters,
    action: Action,
    actor: str,
    dry_run: bool,
    batch_size: int,
) -> Change:
    if filters.empty:
        raise PostroomError("select rows: give ids or filters (or --all)")
    run = str(uuid.uuid4())
    translate = {"schema_translate_map": schema_map(schema)}
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    changed: list[PendingRow] = []
    last_id = 0
    while True:
        async with sessions() as session:  # closing without commit rolls back
            # Rows the relay holds right now are skipped, never waited for.
            query = (
                select(*_COLUMNS)
                .where(*filters.where(), outbox.c.id > last_id)
                .order_by(outbox.c.id)
                .limit(batch_size)
            )
            if not dry_run:
                query = query.with_for_update(skip_locked=True)
            batch = [_row(r) for r in (await session.execute(query, execution_options=translate))]
            if not batch:
                break
            last_id = batch[-1].id
            changed.extend(batch)
            if dry_run:
                continue
            ids = [row.id for row in batch]
            if action is Action.OUTBOX_DISCARD:
                await session.execute(
                    delete(outbox).where(outbox.c.id.in_(ids)), execution_options=translate
                )
            else:
                await session.execute(
                    update(outbox).where(outbox.c.id.in_(ids)).values(available_at=func.now()),
                    execution_options=translate,
                )
            await audit.write(
                session,
                schema=schema,
                actor=actor,
                action=action,
                target_ids=ids,
                count=len(ids),
                details=_details(run, filters, action, batch),
            )
            await session.commit()
    return Change(action, dry_run, run, tuple(changed))


def _details(
    run: str, filters: RowFilters, action: Action, batch: Sequence[PendingRow]
) -> dict[str, Any]:
    details: dict[str, Any] = {"run": run, "filters": filters.as_json()}
    if action is Action.OUTBOX_DISCARD:  # the events are gone: say which they were
        details["rows"] = [
            {"id": r.id, "message_id": r.message_id, "topic": r.topic, "routing_key": r.routing_key}
            for r in batch
        ]
    return details
