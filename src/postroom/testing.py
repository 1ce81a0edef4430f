"""Helpers for testing a service that publishes and consumes with postroom.

No broker and no fakes: :func:`deliver` runs the worker's own dispatch pipeline against
your test database, so the inbox, retry rows and dead letters are written for real and a
test sees the outcomes production would (acked, duplicate, retry, dead). Import it
explicitly (``from postroom import testing``); ``import postroom`` never loads it.

Every helper takes ``schema=``, the schema of postroom's tables. Left out, it is the
schema the process configured (:func:`postroom.configure`, else ``POSTROOM_SCHEMA``, else
``postroom``), like the body limit and NOTIFY setting: the tests write where the
service's own code does. A test may :func:`install` a fresh schema of its own and pass
that name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Row, and_, delete, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from postroom.deadletters import DeadLetter, DeadReason, DeadStatus
from postroom.dispatch import Pipeline, dispatch, dispatch_batch
from postroom.events import Event, topic_of
from postroom.failures import DEFAULT_EXCHANGE, Outcome, Result
from postroom.message import Delivery, HeaderValue, Message, uuid7
from postroom.outbox import Outbox, configured
from postroom.router import Consumer
from postroom.tables import dead_letters as dead_letters_table
from postroom.tables import metadata, outbox, schema_map
from postroom.tracing import new_traceparent

__all__ = [
    "DeadLetter",
    "DeadReason",
    "Outcome",
    "Result",
    "dead_letters",
    "deliver",
    "deliver_batch",
    "deliver_retries",
    "install",
    "message",
    "pending_retries",
    "published",
    "published_messages",
    "uninstall",
]

_E = TypeVar("_E", bound=Event)
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
Source = AsyncSession | async_sessionmaker[AsyncSession]
"""Where the read helpers look: a session (inside its open transaction, so uncommitted
rows are visible) or a session factory (a short session of its own: committed rows)."""


async def install(engine: AsyncEngine, schema: str | None = None) -> None:
    """Create postroom's tables in *schema*, creating the schema too; idempotent.

    Builds the tables from :data:`postroom.tables.metadata`, which a test keeps equal to
    what ``postroom migrate`` creates, and is much faster than migrating. Production
    databases are migrated with ``postroom migrate``, never with this.
    """
    schema = _schema(schema)
    async with engine.begin() as connection:
        await connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{_identifier(schema)}"'))
        translate = schema_map(_schema(schema))
        await connection.run_sync(
            lambda sync: metadata.create_all(sync.execution_options(schema_translate_map=translate))
        )


async def uninstall(engine: AsyncEngine, schema: str) -> None:
    """Drop *schema* and everything in it (the tear-down of :func:`install`)."""
    async with engine.begin() as connection:
        await connection.execute(text(f'DROP SCHEMA IF EXISTS "{_identifier(schema)}" CASCADE'))


def message(
    event: Event,
    *,
    attempt: int = 1,
    key: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    headers: Mapping[str, HeaderValue] | None = None,
) -> Message:
    """Return the message :func:`postroom.publish` would write for *event*, with a new id.

    Deliver the same message twice to see the inbox at work: the second delivery is a
    duplicate and the handler does not run.
    """
    message_id = uuid7()
    return Message(
        message_id=message_id,
        topic=topic_of(event),
        body=event.model_dump_json().encode(),
        occurred_at=datetime.now(UTC),
        key=key,
        correlation_id=correlation_id or str(message_id),
        causation_id=causation_id,
        traceparent=new_traceparent(),
        attempt=attempt,
        extra_headers=dict(headers or {}),
    )


async def published(source: Source, event_type: type[_E], *, schema: str | None = None) -> list[_E]:
    """Return the *event_type* events in the outbox, oldest first, decoded.

    With a session inside a transaction this includes what that transaction wrote and has
    not committed yet; after a rollback there is nothing to see. Only events published to
    the events exchange count: retry and replay rows for a consumer are not publications
    (see :func:`pending_retries`). Rows stay where they are: no relay runs in a test.
    """
    messages = await published_messages(source, topic_of(event_type), schema=schema)
    return [event_type.model_validate_json(m.body) for m in messages]


async def published_messages(
    source: Source, topic: str | None = None, *, schema: str | None = None
) -> list[Message]:
    """Return the messages published to the events exchange (of *topic*, if given).

    Like :func:`published`, with the envelope: ids, key, correlation and causation ids.
    A message returned here can be passed to :func:`deliver`, as the relay would.
    """
    where: list[ColumnElement[bool]] = [outbox.c.exchange.is_(None)]
    if topic is not None:
        where.append(outbox.c.topic == topic)
    rows = await _select_outbox(source, schema, *where)
    return [_message_of(row) for row in rows]


async def pending_retries(
    source: Source, consumer: Consumer[Any], *, schema: str | None = None
) -> list[Message]:
    """Return the retries waiting in the outbox for *consumer*, due or not, oldest first.

    A failed attempt writes the next attempt as an outbox row addressed to the
    consumer's queue alone; its ``attempt`` is the attempt it will be.
    """
    rows = await _select_outbox(source, schema, _retries_of(consumer))
    return [_message_of(row) for row in rows]


async def deliver(
    delivered: Event | Message | Delivery,
    consumer: Consumer[Any],
    sessions: async_sessionmaker[AsyncSession],
    *,
    schema: str | None = None,
    attempt: int | None = None,
    max_body_bytes: int | None = None,
) -> Result:
    """Hand one message to *consumer* through the real dispatch pipeline; return the outcome.

    *delivered* is an event (wrapped in a new :func:`message`), a message (deliver the
    same one again to see :attr:`Outcome.DUPLICATE`), or a raw
    :class:`~postroom.message.Delivery` for malformed input. *attempt* overrides the
    message's attempt number. Everything dispatch writes is committed on *sessions*'
    engine (``async_sessionmaker(engine)``): the inbox row with the handler's writes and
    the events it publishes, or a retry row, or a dead letter; the handler's
    ``ctx.session`` is made from *sessions*. Pass a consumer as ``router["name"]``.
    """
    if isinstance(delivered, Event):
        delivered = message(delivered, attempt=attempt or 1)
    elif isinstance(delivered, Message) and attempt is not None:
        delivered = dataclasses.replace(delivered, attempt=attempt)
    raw = delivered if isinstance(delivered, Delivery) else Delivery.of(delivered)
    return await dispatch(raw, consumer, _pipeline(sessions, schema, max_body_bytes))


async def deliver_batch(
    delivered: Sequence[Event | Message | Delivery],
    consumer: Consumer[Any],
    sessions: async_sessionmaker[AsyncSession],
    *,
    schema: str | None = None,
    max_body_bytes: int | None = None,
) -> list[Result]:
    """Hand several messages to *consumer* as ONE worker batch; return their outcomes, aligned.

    What a worker with ``POSTROOM_WORKER_BATCH_SIZE`` > 1 does with what it took: one
    transaction for the lot (a ``batch=True`` consumer's handler is called once, with
    the events that are neither duplicates nor undecodable); if a handler raises, that
    transaction rolls back and each message is dispatched alone, as :func:`deliver`
    would. Items are as for :func:`deliver`; repeat a message to see it filtered out.
    """
    raw = [
        d if isinstance(d, Delivery) else Delivery.of(message(d) if isinstance(d, Event) else d)
        for d in delivered
    ]
    return await dispatch_batch(raw, consumer, _pipeline(sessions, schema, max_body_bytes))


async def deliver_retries(
    consumer: Consumer[Any],
    sessions: async_sessionmaker[AsyncSession],
    *,
    schema: str | None = None,
    max_body_bytes: int | None = None,
) -> list[Result]:
    """Take *consumer*'s pending retries from the outbox and deliver them now.

    Does what the relay and the worker would do once the backoff has passed, without
    waiting for it: the rows are removed (as the relay removes what it published), then
    each is dispatched. Call it again to walk the next attempt, until a result is
    ``acked`` or ``dead``; an empty list means nothing was pending.
    """
    async with sessions() as session, session.begin():
        taken = await session.execute(
            delete(outbox)
            .where(_retries_of(consumer))
            .returning(*outbox.c)
            .execution_options(schema_translate_map=schema_map(_schema(schema))),
        )
        rows = sorted(taken.all(), key=lambda row: row.id)
    pipeline = _pipeline(sessions, schema, max_body_bytes)
    return [await dispatch(_delivery_of(row), consumer, pipeline) for row in rows]


async def dead_letters(
    source: Source,
    consumer: Consumer[Any] | None = None,
    *,
    schema: str | None = None,
) -> list[DeadLetter]:
    """Return the live dead letters (of *consumer*, if given), oldest first."""
    table = dead_letters_table
    statement = select(table).where(table.c.status == DeadStatus.DEAD.value)
    if consumer is not None:
        statement = statement.where(table.c.consumer == consumer.name)
    async with _reading(source) as session:
        result = await session.execute(
            statement.order_by(table.c.id),
            execution_options={"schema_translate_map": schema_map(_schema(schema))},
        )
        rows = result.all()
    return [
        DeadLetter(
            consumer=row.consumer,
            message_id=row.message_id,
            topic=row.topic,
            reason=DeadReason(row.reason),
            error_type=row.error_type,
            error_message=row.error_message,
            traceback=row.traceback,
            attempts=row.attempts,
            first_failed_at=row.first_failed_at,
            last_failed_at=row.last_failed_at,
            headers=row.headers,
            body=row.body,
            content_type=row.content_type,
            correlation_id=row.correlation_id,
        )
        for row in rows
    ]


def _pipeline(
    sessions: async_sessionmaker[AsyncSession], schema: str | None, max_body_bytes: int | None
) -> Pipeline:
    """Dispatch as the worker would, writing to the configured outbox unless overridden."""
    base = configured()
    outbox = Outbox(
        schema=_schema(schema),
        max_body_bytes=base.max_body_bytes if max_body_bytes is None else max_body_bytes,
        notify=base.notify,
    )
    return Pipeline(sessions=sessions, outbox=outbox, max_body_bytes=outbox.max_body_bytes)


def _schema(schema: str | None) -> str:
    """The schema a helper reads or writes: the one given, else the configured one."""
    return configured().schema if schema is None else schema


def _retries_of(consumer: Consumer[Any]) -> ColumnElement[bool]:
    """Retry (and replay) rows go to the consumer's queue through the default exchange."""
    return and_(outbox.c.exchange == DEFAULT_EXCHANGE, outbox.c.routing_key == consumer.name)


async def _select_outbox(
    source: Source, schema: str | None, *where: ColumnElement[bool]
) -> list[Row[Any]]:
    async with _reading(source) as session:
        result = await session.execute(
            select(outbox).where(*where).order_by(outbox.c.id),
            execution_options={"schema_translate_map": schema_map(_schema(schema))},
        )
        return list(result.all())


@contextlib.asynccontextmanager
async def _reading(source: Source) -> AsyncIterator[AsyncSession]:
    """Yield a session to read with, never leaving a transaction open that was not."""
    if isinstance(source, AsyncSession):
        if source.in_transaction() or source.bind is None:
            yield source  # its transaction: its own uncommitted writes are visible
            return
        async with AsyncSession(bind=source.bind) as session:
            yield session
        return
    async with source() as session:
        yield session


def _delivery_of(row: Row[Any]) -> Delivery:
    """The delivery a worker would get once the relay published *row*."""
    return Delivery(
        body=row.body,
        message_id=str(row.message_id),
        type=row.topic,
        timestamp=row.occurred_at,
        content_type=row.content_type,
        correlation_id=row.correlation_id,
        headers=row.headers,
    )


def _message_of(row: Row[Any]) -> Message:
    return _delivery_of(row).decode()


def _identifier(schema: str) -> str:
    if not _IDENTIFIER.match(schema):
        raise ValueError(f"schema {schema!r} must be a lower-case SQL identifier")
    return schema
