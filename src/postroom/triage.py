"""Look at dead letters: filter them, list them, group them by error shape, show one.

Read-only. :class:`Filters` is validated once (:meth:`Filters.parse`) so the CLI, scripts
and the replay and purge commands share one meaning of "consumer X's TimeoutErrors of
the last hour". Times are filtered on ``created_at``, when the message became dead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from postroom.deadletters import DeadReason, DeadStatus
from postroom.errors import InvalidFilterError, UnknownDeadLetterError
from postroom.tables import dead_letters, schema_map

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

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


def parse_time(value: str, *, name: str = "time", now: datetime | None = None) -> datetime:
    """Parse an ISO 8601 time (UTC unless it has an offset) or an age such as ``90m``, ``2d``."""
    text = value.strip()
    age = _AGE.match(text)
    if age:
        ago = timedelta(**{_UNITS[age.group(2)]: float(age.group(1))})
        return (now or datetime.now(UTC)) - ago
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidFilterError(
            f"{name} {value!r} is not a time: give ISO 8601 (2026-11-26 or 2026-11-26T10:00, "
            "UTC unless an offset is given) or an age such as 30s, 90m, 6h, 2d, 1w"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _choice(enum: Any, value: str | None, name: str) -> Any:
    if value is None:
        return None
    try:
        return enum(value)
    except ValueError:
        known = ", ".join(member.value for member in enum)
        raise InvalidFilterError(f"unknown {name} {value!r}; known: {known}") from None


def _like(value: str) -> str:
    """Escape LIKE's wildcards so *value* matches literally (ESCAPE '\\')."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters a command acts on; every field given must match (AND)."""

    consumer: str | None = None
    topic: str | None = None
    error_type: str | None = None
    """The exception's qualified name, or its last dotted part (``TimeoutError``)."""
    text: str | None = None
    """Case-insensitive text anywhere in "error type: error message", taken literally."""
    reason: DeadReason | None = None
    status: DeadStatus | None = None
    """None: any status."""
    since: datetime | None = None
    until: datetime | None = None
    ids: tuple[int, ...] = ()

    @classmethod
    def parse(
        cls,
        *,
        consumer: str | None = None,
        topic: str | None = None,
        error_type: str | None = None,
        text: str | None = None,
        reason: str | None = None,
        status: str | None = None,
        since: str | None = None,
        until: str | None = None,
        ids: Sequence[int] = (),
        now: datetime | None = None,
    ) -> Filters:
        """Build filters from text, as typed by a person; raise InvalidFilterError if bad.

        *status* ``"all"`` (or None) means any status.
        """
        for name, value in (
            ("consumer", consumer),
            ("topic", topic),
            ("error type", error_type),
            ("text", text),
        ):
            if value is not None and not value.strip():
                raise InvalidFilterError(f"the {name} filter is empty")
        start = parse_time(since, name="--since", now=now) if since else None
        end = parse_time(until, name="--until", now=now) if until else None
        if start and end and start >= end:
            raise InvalidFilterError(f"--since ({start:%Y-%m-%d %H:%M:%S}) is not before --until")
        if any(i < 1 for i in ids):
            raise InvalidFilterError("dead-letter ids are positive integers")
        return cls(
            consumer=consumer,
            topic=topic,
            error_type=error_type,
            text=text,
            reason=_choice(DeadReason, reason, "reason"),
            status=None if status == "all" else _choice(DeadStatus, status, "status"),
            since=start,
            until=end,
            ids=tuple(dict.fromkeys(ids)),
        )

    @property
    def narrows(self) -> bool:
        """True if anything besides the status narrows the selection."""
        return any(getattr(self, f.name) for f in fields(self) if f.name != "status")

    def as_json(self) -> dict[str, Any]:
        """The criteria given, JSON-ready (for reports and audit rows)."""
        shown: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == ():
                continue
            shown[f.name] = value.isoformat() if isinstance(value, datetime) else value
            if isinstance(value, tuple):
                shown[f.name] = list(value)
        return shown

    def clauses(self) -> list[ColumnElement[bool]]:
        """The WHERE clauses on the dead_letters table; values are bound parameters."""
        c = dead_letters.c
        where: list[ColumnElement[bool]] = []
        if self.consumer is not None:
            where.append(c.consumer == self.consumer)
        if self.topic is not None:
            where.append(c.topic == self.topic)
        if self.error_type is not None:
            suffix = "%." + _like(self.error_type)
            where.append(or_(c.error_type == self.error_type, c.error_type.like(suffix, "\\")))
        if self.text is not None:
            described = c.error_type + literal(": ") + c.error_message
            where.append(described.ilike("%" + _like(self.text) + "%", "\\"))
        if self.reason is not None:
            where.append(c.reason == self.reason.value)
        if self.status is not None:
            where.append(c.status == self.status.value)
        if self.since is not None:
            where.append(c.created_at >= self.since)
        if self.until is not None:
            where.append(c.created_at < self.until)
        if self.ids:
            where.append(c.id.in_(self.ids))
        return where


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
        return {
            f.name: (v.isoformat() if isinstance(v := getattr(self, f.name), datetime) else v)
            for f in fields(self)
        }


@dataclass(frozen=True, slots=True)
class Detail:
    """A whole dead letter: the listing plus the traceback and the message as received."""

    letter: Letter
    traceback: str | None
    headers: Mapping[str, Any]
    body: bytes
    content_type: str | None
    correlation_id: str | None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; pass ``next_before`` as ``before`` for the next (older) page."""

    letters: list[Letter]
    next_before: int | None


@dataclass(frozen=True, slots=True)
class Group:
    """Dead letters sharing consumer, error type and error-message shape."""

    consumer: str
    error_type: str
    shape: str
    count: int
    first_seen: datetime
    last_seen: datetime
    latest_id: int

    def as_json(self) -> dict[str, Any]:
        return {
            f.name: (v.isoformat() if isinstance(v := getattr(self, f.name), datetime) else v)
            for f in fields(self)
        }


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


async def check_ids(connection: AsyncConnection, schema: str, ids: Sequence[int]) -> None:
    """Raise UnknownDeadLetterError naming every id in *ids* that is no dead letter."""
    if not ids:
        return
    query = select(dead_letters.c.id).where(dead_letters.c.id.in_(ids))
    known = {row.id for row in await _run(connection, query, schema)}
    missing = sorted(set(ids) - known)
    if missing:
        raise UnknownDeadLetterError(missing)


async def list_letters(
    engine: AsyncEngine,
    schema: str,
    filters: Filters,
    *,
    limit: int = 50,
    before: int | None = None,
) -> Page:
    """Return the newest dead letters matching *filters*, older than id *before* if given."""
    query = select(*_LISTED).where(*filters.clauses())
    if before is not None:
        query = query.where(dead_letters.c.id < before)
    query = query.order_by(dead_letters.c.id.desc()).limit(limit + 1)
    async with engine.connect() as connection:
        await check_ids(connection, schema, filters.ids)
        rows = await _run(connection, query, schema)
    letters = [Letter(**row._mapping) for row in rows[:limit]]
    more = len(rows) > limit
    return Page(letters=letters, next_before=letters[-1].id if more else None)


async def group_letters(
    engine: AsyncEngine, schema: str, filters: Filters, *, limit: int = 100
) -> list[Group]:
    """Count dead letters by (consumer, error type, error shape), largest groups first."""
    c = dead_letters.c
    shape = shape_of(c.error_message).label("shape")
    count = func.count().label("count")
    query = (
        select(
            c.consumer,
            c.error_type,
            shape,
            count,
            func.min(c.first_failed_at).label("first_seen"),
            func.max(c.last_failed_at).label("last_seen"),
            func.max(c.id).label("latest_id"),
        )
        .where(*filters.clauses())
        .group_by(c.consumer, c.error_type, shape)
        .order_by(count.desc(), c.consumer, c.error_type, shape)
        .limit(limit)
    )
    async with engine.connect() as connection:
        rows = await _run(connection, query, schema)
    return [Group(**row._mapping) for row in rows]


async def get_letter(engine: AsyncEngine, schema: str, letter_id: int) -> Detail:
    """Return the whole dead letter *letter_id*; raise UnknownDeadLetterError if none."""
    c = dead_letters.c
    extra = [c.traceback, c.headers, c.body, c.content_type, c.correlation_id]
    query = select(*_LISTED, *extra).where(c.id == letter_id)
    async with engine.connect() as connection:
        rows = await _run(connection, query, schema)
    if not rows:
        raise UnknownDeadLetterError([letter_id])
    row = rows[0]._mapping
    return Detail(
        letter=Letter(**{f.name: row[f.name] for f in fields(Letter)}),
        traceback=row["traceback"],
        headers=row["headers"],
        body=bytes(row["body"]),
        content_type=row["content_type"],
        correlation_id=row["correlation_id"],
    )
