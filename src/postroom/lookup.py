"""Look at dead letters: list them, group them by error shape, show one and its chain.

Read-only. An empty answer is checked against the known names
(:func:`filters.check_names`), so a mistyped consumer is an error listing the known ones,
not an empty answer (a name that matched something needs no check). A
message's *chain* is every dead letter it became, for one consumer, across replays (a
replayed message that fails again is a new dead letter with the same message id).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from postroom.errors import UnknownDeadLetterError
from postroom.filters import Filters, check_ids, check_names
from postroom.redaction import mask
from postroom.tables import dead_letters, schema_map

if TYPE_CHECKING:
    from postroom.router import Router

# An error message's shape: the varying parts replaced by placeholders, in this order
# (a UUID holds hex and digits; a quoted string may hold anything).
SHAPE_RULES: tuple[tuple[str, str], ...] = (
    (r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", "<uuid>"),
    (r"'[^']*'", "<str>"),
    (r'"[^"]*"', "<str>"),
    (r"\m0[xX][0-9a-fA-F]+\M", "<hex>"),
    (r"\m(?=[0-9a-fA-F]*[0-9])(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,}\M", "<hex>"),
    (r"[0-9]+(\.[0-9]+)?", "<n>"),
)
SHAPE_CHARS = 300


def _json(value: Any) -> dict[str, Any]:
    return {
        f.name: (v.isoformat() if isinstance(v := getattr(value, f.name), datetime) else v)
        for f in fields(value)
    }


@dataclass(frozen=True, slots=True)
class Letter:
    """A dead letter as listed: what failed, where, how and what became of it."""

    id: int
    consumer: str
    message_id: str
    topic: str | None
    reason: str
    error_type: str
    error_message: str
    attempts: int
    replays: int
    status: str
    first_failed_at: datetime
    last_failed_at: datetime
    created_at: datetime
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        return _json(self)


@dataclass(frozen=True, slots=True)
class Detail:
    """A whole dead letter: the listing, the traceback, the message, and its chain."""

    letter: Letter
    traceback: str | None
    headers: Mapping[str, Any]
    body: bytes
    content_type: str | None
    correlation_id: str | None
    chain: tuple[Letter, ...] = ()
    """Every dead letter of this message for this consumer, oldest first (this one too)."""


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; pass ``next_before`` as ``before`` for the next (older) page."""

    letters: list[Letter]
    next_before: int | None


@dataclass(frozen=True, slots=True)
class Group:
    """Dead letters sharing status, consumer, error type and error-message shape."""

    status: str
    consumer: str
    error_type: str
    shape: str
    count: int
    first_seen: datetime
    last_seen: datetime
    latest_id: int

    def as_json(self) -> dict[str, Any]:
        return _json(self)


_LISTED = [dead_letters.c[f.name] for f in fields(Letter)]


def shape_of(column: ColumnElement[str]) -> ColumnElement[str]:
    """The SQL expression of an error message's shape (see SHAPE_RULES)."""
    expression: ColumnElement[str] = column
    for pattern, placeholder in SHAPE_RULES:
        expression = func.regexp_replace(expression, pattern, placeholder, "g")
    return func.left(expression, SHAPE_CHARS)


async def _run(connection: AsyncConnection, query: Select[Any], schema: str) -> list[Any]:
    result = await connection.execute(
        query, execution_options={"schema_translate_map": schema_map(schema)}
    )
    return list(result.all())


async def list_letters(
    engine: AsyncEngine,
    schema: str,
    filters: Filters,
    *,
    limit: int = 50,
    before: int | None = None,
    router: Router | None = None,
) -> Page:
    """Return the newest dead letters matching *filters*, older than id *before* if given."""
    query = select(*_LISTED).where(*filters.clauses())
    if before is not None:
        query = query.where(dead_letters.c.id < before)
    query = query.order_by(dead_letters.c.id.desc()).limit(limit + 1)
    async with engine.connect() as connection:
        await check_ids(connection, schema, filters.ids)
        rows = await _run(connection, query, schema)
        if not rows:  # a name that matched something is known: check only when empty
            await check_names(connection, schema, filters, router=router)
    letters = [Letter(**row._mapping) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(letters=letters, next_before=letters[-1].id if more else None)


async def group_letters(
    engine: AsyncEngine,
    schema: str,
    filters: Filters,
    *,
    limit: int = 100,
    router: Router | None = None,
) -> list[Group]:
    """Count dead letters by (status, consumer, error type, error shape), largest first.

    Statuses are never added together: after a replay the replayed ones are their own
    group, so "300 dead" and "300 replayed" are never shown as 600 of anything.
    """
    c = dead_letters.c
    shape = shape_of(c.error_message).label("shape")
    count = func.count().label("count")
    query = (
        select(
            c.status,
            c.consumer,
            c.error_type,
            shape,
            count,
            func.min(c.first_failed_at).label("first_seen"),
            func.max(c.last_failed_at).label("last_seen"),
            func.max(c.id).label("latest_id"),
        )
        .where(*filters.clauses())
        .group_by(c.status, c.consumer, c.error_type, shape)
        .order_by(count.desc(), c.status, c.consumer, c.error_type, shape)
        .limit(limit)
    )
    async with engine.connect() as connection:
        await check_ids(connection, schema, filters.ids)
        rows = await _run(connection, query, schema)
        if not rows:
            await check_names(connection, schema, filters, router=router)
    return [Group(**row._mapping) for row in rows]


async def get_letter(
    engine: AsyncEngine, schema: str, letter_id: int, *, router: Router | None = None
) -> Detail:
    """Return the whole dead letter *letter_id* and its chain; UnknownDeadLetterError if none.

    With *router*, the body and headers are shown redacted by the consumer's redaction
    (for dead letters stored before it was declared; newer ones were stored redacted).
    """
    c = dead_letters.c
    extra = [c.traceback, c.headers, c.body, c.content_type, c.correlation_id]
    query = select(*_LISTED, *extra).where(c.id == letter_id)
    async with engine.connect() as connection:
        rows = await _run(connection, query, schema)
        if not rows:
            raise UnknownDeadLetterError([letter_id])
        row = rows[0]._mapping
        hops = select(*_LISTED).where(
            c.consumer == row["consumer"], c.message_id == row["message_id"]
        )
        chain = [
            Letter(**hop._mapping) for hop in await _run(connection, hops.order_by(c.id), schema)
        ]
    detail = Detail(
        letter=Letter(**{f.name: row[f.name] for f in fields(Letter)}),
        traceback=row["traceback"],
        headers=row["headers"],
        body=bytes(row["body"]),
        content_type=row["content_type"],
        correlation_id=row["correlation_id"],
        chain=tuple(chain),
    )
    consumer = _consumer(router, detail.letter.consumer)
    if consumer is not None and consumer.redaction is not None:
        secrets = consumer.redaction.secrets(detail.body, detail.headers)
        body, headers = consumer.redaction.apply(detail.body, detail.headers)
        message = mask(detail.letter.error_message, secrets)
        letter = replace(detail.letter, error_message=message)
        detail = replace(
            detail,
            letter=letter,
            body=body,
            headers=headers,
            traceback=None if detail.traceback is None else mask(detail.traceback, secrets),
        )
    return detail


async def elsewhere(engine: AsyncEngine, schema: str, filters: Filters) -> dict[str, int]:
    """Count the dead letters *filters* select in any status, by status.

    Says where a selection went when a command found nothing in the status it wanted
    (already replayed, purged, or taken by a concurrent run).
    """
    c = dead_letters.c
    query = (
        select(c.status, func.count().label("n"))
        .where(*replace(filters, status=None).clauses())
        .group_by(c.status)
        .order_by(c.status)
    )
    async with engine.connect() as connection:
        rows = await _run(connection, query, schema)
    return {row.status: int(row.n) for row in rows}


def _consumer(router: Router | None, name: str) -> Any:
    if router is None:
        return None
    return next((x for x in router if x.name == name), None)
