"""Filters: which dead letters an ops command acts on, parsed and checked once.

:class:`Filters` is built from what a person typed (:meth:`Filters.parse`) so the CLI,
the console and scripts share one meaning of "consumer X's TimeoutErrors of the last
hour". Names are checked against what exists (:func:`check_names`): a mistyped consumer,
topic or error type is an error listing the known ones, never a silent empty selection.
Times are filtered on ``created_at``, when the message became dead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from postroom.deadletters import DeadReason, DeadStatus
from postroom.errors import InvalidFilterError, UnknownDeadLetterError
from postroom.tables import dead_letters, schema_map

if TYPE_CHECKING:
    from postroom.router import Router

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
KNOWN_SHOWN = 25
"""Known names listed in an "unknown name" error; more are summarised as a count."""


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


def shown_time(value: datetime) -> str:
    """A time as error messages show it: to the second, in UTC, saying so."""
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _choice(enum: Any, value: str | None, name: str, *extra: str) -> Any:
    if value is None:
        return None
    try:
        return enum(value)
    except ValueError:
        known = ", ".join([*(member.value for member in enum), *extra])
        raise InvalidFilterError(f"unknown {name} {value!r}; known: {known}") from None


def _like(value: str) -> str:
    """Escape LIKE's wildcards so *value* matches literally (ESCAPE '\\')."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def error_type_key(name: str) -> str:
    """Normalise an exception name for matching: any case, ``builtins.`` implied."""
    lowered = name.strip().lower()
    return lowered.removeprefix("builtins.")


def error_type_matches(given: str, stored: str) -> bool:
    """True if *given* names *stored*: equal, or its dotted tail, in any case."""
    want, have = error_type_key(given), error_type_key(stored)
    return have == want or have.endswith("." + want)


@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters a command acts on; every field given must match (AND)."""

    consumer: str | None = None
    topic: str | None = None
    error_type: str | None = None
    """The exception's qualified name or a dotted tail of it (``TimeoutError``); any case."""
    text: str | None = None
    """Case-insensitive text anywhere in "error type: error message", taken literally."""
    reason: DeadReason | None = None
    status: DeadStatus | None = None
    """None: any status."""
    since: datetime | None = None
    until: datetime | None = None
    ids: tuple[int, ...] = ()
    message_id: str | None = None
    """One message: every dead letter it became, across its replays."""

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
        message_id: str | None = None,
        now: datetime | None = None,
    ) -> Filters:
        """Build filters from text, as typed by a person; raise InvalidFilterError if bad.

        *status* ``"all"`` (or None) means any status. A ``--since`` in the future and a
        range whose start is not before its end are errors, with both times in UTC.
        """
        for name, value in (
            ("consumer", consumer),
            ("topic", topic),
            ("error type", error_type),
            ("text", text),
            ("message id", message_id),
        ):
            if value is not None and not value.strip():
                raise InvalidFilterError(f"the {name} filter is empty")
        moment = now or datetime.now(UTC)
        start = parse_time(since, name="--since", now=moment) if since else None
        end = parse_time(until, name="--until", now=moment) if until else None
        if start and start > moment:
            raise InvalidFilterError(
                f"--since {since!r} is {shown_time(start)}, in the future "
                f"(now is {shown_time(moment)}): nothing can match"
            )
        if start and end and start >= end:
            raise InvalidFilterError(
                f"--since ({shown_time(start)}) is not before --until ({shown_time(end)})"
            )
        if any(i < 1 for i in ids):
            raise InvalidFilterError("dead-letter ids are positive integers")
        return cls(
            consumer=consumer,
            topic=topic,
            error_type=error_type.strip() if error_type else None,
            text=text,
            reason=_choice(DeadReason, reason, "reason"),
            status=None if status == "all" else _choice(DeadStatus, status, "status", "all"),
            since=start,
            until=end,
            ids=tuple(dict.fromkeys(ids)),
            message_id=message_id.strip() if message_id else None,
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
            key = error_type_key(self.error_type)
            stored = func.lower(c.error_type)
            where.append(or_(stored == key, stored.like("%." + _like(key), "\\")))
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
        if self.message_id is not None:
            where.append(c.message_id == self.message_id)
        return where


async def check_ids(connection: AsyncConnection, schema: str, ids: Sequence[int]) -> None:
    """Raise UnknownDeadLetterError naming every id in *ids* that is no dead letter."""
    if not ids:
        return
    query = select(dead_letters.c.id).where(dead_letters.c.id.in_(ids))
    translate = {"schema_translate_map": schema_map(schema)}
    known = set((await connection.execute(query, execution_options=translate)).scalars())
    missing = sorted(set(ids) - known)
    if missing:
        raise UnknownDeadLetterError(missing)


async def check_names(
    connection: AsyncConnection, schema: str, filters: Filters, *, router: Router | None = None
) -> None:
    """Raise InvalidFilterError if a consumer, topic or error type names nothing known.

    Known: what the dead letters (any status) hold and, if *router* is given, its
    consumers and their topics. Also checks the ids (UnknownDeadLetterError). Each name
    costs a DISTINCT over the table, so callers check when a selection came back empty
    (a name that matched a row is known).
    """
    await check_ids(connection, schema, filters.ids)
    translate = {"schema_translate_map": schema_map(schema)}
    c = dead_letters.c

    async def distinct(column: Any) -> set[str]:
        query = select(column).where(column.is_not(None)).distinct()
        return set((await connection.execute(query, execution_options=translate)).scalars())

    if filters.consumer is not None:
        known = await distinct(c.consumer) | {x.name for x in router or ()}
        if filters.consumer not in known:
            raise InvalidFilterError(_unknown("consumer", filters.consumer, known))
    if filters.topic is not None:
        known = await distinct(c.topic) | {t for x in router or () for t in x.topics}
        if filters.topic not in known:
            raise InvalidFilterError(_unknown("topic", filters.topic, known))
    if filters.error_type is not None:
        known = await distinct(c.error_type)
        if not any(error_type_matches(filters.error_type, name) for name in known):
            raise InvalidFilterError(_unknown("error type", filters.error_type, known))


def _unknown(kind: str, value: str, known: Iterable[str]) -> str:
    names = sorted(known)
    if not names:
        return f"unknown {kind} {value!r}: there are no dead letters at all"
    shown = ", ".join(names[:KNOWN_SHOWN])
    if len(names) > KNOWN_SHOWN:
        shown += f" and {len(names) - KNOWN_SHOWN} more"
    return f"unknown {kind} {value!r}; known: {shown}"
