"""The write path: put a message in the outbox inside the caller's transaction.

``publish`` never commits, flushes or rolls back: the caller owns the transaction, so
the event exists exactly when the caller's own writes commit.
"""

from __future__ import annotations

import functools
import weakref
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Interval, bindparam, func, insert, select, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession

from postroom.errors import (
    ConfigError,
    InvalidMessageError,
    MessageTooLargeError,
    NotInTransactionError,
    SchemaNotReadyError,
)
from postroom.events import Event, topic_of
from postroom.message import HeaderValue, Message, uuid7
from postroom.settings import Settings, publishing_values
from postroom.tables import DEFAULT_SCHEMA, outbox, schema_map
from postroom.tracing import current_traceparent, new_traceparent

DEFAULT_MAX_BODY_BYTES = 1_048_576
_RESERVED_PREFIXES = ("x-", "postroom-", "cloudevents_", "cloudevents:", "ce-", "ce_")
_NOTIFIED = "postroom.notified_transaction"
_NOT_MIGRATED = ("42P01", "3F000")  # undefined table, invalid schema name

DRIVEN_TRANSACTION = "postroom_driven_transaction"
"""Execution option on an AUTOCOMMIT connection whose transaction postroom drives itself.

A consumer's lane (:mod:`postroom.lanes`) sends ``BEGIN`` and ``COMMIT`` on the driver
connection and hands the handler a SQLAlchemy connection in AUTOCOMMIT, so that
SQLAlchemy sends neither; the option tells :meth:`Outbox.write` that such a connection
is inside a transaction after all."""


log = structlog.get_logger("postroom.outbox")

RELAY_PRESENCE = 0x506F7374
"""First key of the shared advisory lock a relay holds while it serves a schema."""


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel the relay of *schema* wakes on."""
    return f"{schema}.outbox"


def relay_presence_key(schema: str) -> int:
    """Second key of the advisory lock a relay of *schema* holds (shared) while it runs.

    Visible to every session in ``pg_locks``, so a producer and ``postroom check`` can
    tell which schemas a relay serves without a table of their own.
    """
    return zlib.crc32(f"postroom-relay:{schema}".encode()) & 0x7FFFFFFF


@dataclass(frozen=True, slots=True)
class Outbox:
    """Where and how messages are written: schema, body limit, NOTIFY.

    :func:`publish` writes through the one :func:`configure` set; build one yourself only
    to write to a second outbox on purpose.
    """

    schema: str = DEFAULT_SCHEMA
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    notify: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> Outbox:
        return cls(
            schema=settings.schema_name,
            max_body_bytes=settings.max_body_bytes,
            notify=settings.notify,
        )

    async def publish(
        self,
        session: AsyncSession,
        event: Event,
        *,
        key: str | None = None,
        delay: timedelta | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        traceparent: str | None = None,
    ) -> Message:
        """Write *event* to the outbox in *session*'s open transaction and return its message.

        Rows sharing *key* are relayed in commit order; *delay* holds the message back.
        The row carries *traceparent*, else the current OpenTelemetry span's, else a new
        trace's.
        Raises NotInTransactionError (no transaction is open), MessageTooLargeError and
        EventDefinitionError before anything is written, and SchemaNotReadyError if the
        outbox table does not exist (run ``postroom migrate``).
        """
        topic = topic_of(event)
        body = event.model_dump_json().encode()
        message_id = uuid7()
        message = Message(
            message_id=message_id,
            topic=topic,
            body=body,
            occurred_at=datetime.now(UTC),
            key=key,
            correlation_id=correlation_id or str(message_id),
            causation_id=causation_id,
            traceparent=traceparent or current_traceparent() or new_traceparent(),
            extra_headers=_check_headers(headers),
        )
        await self.write(session, message, routing_key=topic, ordering_key=key, delay=delay)
        return message

    async def write(
        self,
        session: AsyncSession,
        message: Message,
        *,
        routing_key: str,
        exchange: str | None = None,
        ordering_key: str | None = None,
        delay: timedelta | None = None,
    ) -> None:
        """Insert one prepared message; `exchange=None` means the relay's events exchange.

        Used by :meth:`publish`, by retries (default exchange, routing key = the failing
        consumer's queue) and by replays. Raises like :meth:`publish`.
        """
        if not session.in_transaction():
            raise NotInTransactionError(
                "publish() needs an open transaction (`async with session.begin(): ...`) "
                "so the event commits or rolls back with your own writes"
            )
        if len(message.body) > self.max_body_bytes:
            raise MessageTooLargeError(len(message.body), self.max_body_bytes, message.topic)
        connection = await session.connection()
        sync = connection.sync_connection
        options = sync.get_execution_options() if sync is not None else {}
        if options.get("isolation_level") == "AUTOCOMMIT" and not options.get(DRIVEN_TRANSACTION):
            raise NotInTransactionError(
                "publish() refuses an AUTOCOMMIT connection: the row would commit on its own"
            )
        values: dict[str, Any] = {
            "message_id": message.message_id,
            "topic": message.topic,
            "ordering_key": ordering_key,
            "exchange": exchange,
            "routing_key": routing_key,
            "headers": message.amqp_headers(),
            "body": message.body,
            "content_type": message.content_type,
            "correlation_id": message.correlation_id,
            "occurred_at": message.occurred_at,
        }
        delayed = delay is not None and delay > timedelta(0)
        if delayed:
            values["delay"] = delay
        notify = self.notify and not _notified(session)
        statement = _insert_statement(self.schema if notify else None, delayed=delayed)
        translate = {"schema_translate_map": schema_map(self.schema)}
        try:
            await connection.execute(statement, values, execution_options=translate)
        except ProgrammingError as exc:
            if getattr(exc.orig, "sqlstate", None) in _NOT_MIGRATED:
                raise SchemaNotReadyError(self.schema, None, None) from exc
            raise


@functools.cache
def _insert_statement(notify_schema: str | None, *, delayed: bool) -> Any:
    """The outbox INSERT with bound parameters, built once per shape.

    Building ``insert().values(...)`` per call cost more client CPU than the rest of a
    one-row transaction (docs/performance.md); a prebuilt statement also keeps
    SQLAlchemy's compiled cache to one entry per shape.
    """
    columns = [c.name for c in outbox.columns if c.name in _WRITTEN]
    values: dict[str, Any] = {name: bindparam(name, type_=outbox.c[name].type) for name in columns}
    if delayed:
        values["available_at"] = func.now() + bindparam("delay", type_=Interval())
    statement: Any = insert(outbox).values(values)
    if notify_schema is not None:
        # One round trip: the INSERT rides in a CTE of the NOTIFY. One NOTIFY per
        # transaction, because each one serialises commits on the notify queue.
        statement = select(func.pg_notify(notify_channel(notify_schema), "")).add_cte(
            statement.cte("postroom_outbox_insert")
        )
    return statement


_WRITTEN = frozenset(
    (
        "message_id",
        "topic",
        "ordering_key",
        "exchange",
        "routing_key",
        "headers",
        "body",
        "content_type",
        "correlation_id",
        "occurred_at",
    )
)


def _notified(session: AsyncSession) -> bool:
    """Return True if this transaction already sent its NOTIFY; mark it sent otherwise."""
    transaction = session.sync_session.get_transaction()
    if transaction is None:
        return False
    seen = session.info.get(_NOTIFIED)
    if seen is not None and seen() is transaction:
        return True
    session.info[_NOTIFIED] = weakref.ref(transaction)
    return False


def _check_headers(headers: Mapping[str, HeaderValue] | None) -> dict[str, HeaderValue]:
    checked: dict[str, HeaderValue] = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or name.lower().startswith(_RESERVED_PREFIXES):
            raise InvalidMessageError(
                f"header {name!r} is reserved (x-, postroom-, cloudEvents and ce- prefixes)"
            )
        if value is not None and not isinstance(value, str | int | float | bool):
            raise InvalidMessageError(f"header {name!r} must be str, int, float, bool or None")
        checked[name] = value
    return checked


async def publish(
    session: AsyncSession,
    event: Event,
    *,
    key: str | None = None,
    delay: timedelta | None = None,
    headers: Mapping[str, HeaderValue] | None = None,
) -> Message:
    """Write *event* to the configured outbox in *session*'s transaction.

    The outbox is the one :func:`configure` set at start-up; without a call, the first
    publish configures it from ``POSTROOM_SCHEMA``, ``POSTROOM_MAX_BODY_BYTES`` and
    ``POSTROOM_NOTIFY``, the variables the relay and the worker read. See
    :meth:`Outbox.publish` for the rest of the contract.
    """
    outbox = configured()
    if _state.unchecked:
        await _check_relays(session, outbox)
    return await outbox.publish(session, event, key=key, delay=delay, headers=headers)


class _State:
    """The process's configured outbox (see :func:`configure`); one per process."""

    outbox: Outbox | None = None
    unchecked: bool = True


_state = _State()


def configure(source: Settings | Outbox | None = None, *, replace: bool = False) -> Outbox:
    """Set the outbox :func:`publish` and the testing helpers write to; call once at start-up.

    *source* is the process's :class:`Settings` (what ``postroom relay`` and ``postroom
    worker`` do), an explicit :class:`Outbox`, or None: then ``POSTROOM_SCHEMA``,
    ``POSTROOM_MAX_BODY_BYTES`` and ``POSTROOM_NOTIFY`` are read from the environment, the
    same variables the relay and the worker read, and an unknown ``POSTROOM_*`` variable
    is an error. Configuring again with the same values is a no-op; with other values it
    raises ConfigError (a process writing to two outboxes by accident is the bug this
    prevents) unless *replace* is set, for tests and reloads. Returns the outbox in use.
    """
    if isinstance(source, Settings):
        wanted = Outbox.from_settings(source)
    elif isinstance(source, Outbox):
        wanted = source
    else:
        wanted = Outbox(**publishing_values())
    current = _state.outbox
    if current == wanted:
        return current
    if current is not None and not replace:
        raise ConfigError(
            f"postroom is already configured with {_describe(current)}; configuring it again "
            f"with {_describe(wanted)} would split its events between two outboxes: call "
            "postroom.configure() once, at start-up, before the first publish"
        )
    _state.unchecked = True
    _state.outbox = wanted
    return wanted


def configured() -> Outbox:
    """Return the outbox :func:`configure` set, configuring it from the environment if needed."""
    return _state.outbox if _state.outbox is not None else configure()


def _describe(outbox: Outbox) -> str:
    return (
        f"schema {outbox.schema!r}, max_body_bytes {outbox.max_body_bytes}, notify {outbox.notify}"
    )


_PRESENCE_SQL = text(
    "SELECT coalesce(bool_or(objid::bigint = :key), false) AS ours, "
    "coalesce(bool_or(objid::bigint <> :key), false) AS others "
    "FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = :ns AND objsubid = 2"
)


async def _check_relays(session: AsyncSession, outbox: Outbox) -> None:
    """Warn once if relays run in this database but none serves the schema we publish to.

    That is a producer and its relays configured with different ``POSTROOM_SCHEMA``: the
    events would wait where no relay reads. No relay at all is normal (not started yet, a
    test) and stays quiet. Runs once per configuration, in the caller's transaction.
    """
    if not session.in_transaction():
        return  # publish() raises the real error just after; check at the next one
    _state.unchecked = False
    params = {"key": relay_presence_key(outbox.schema), "ns": RELAY_PRESENCE}
    row = (await session.execute(_PRESENCE_SQL, params)).one()
    if row.others and not row.ours:
        log.warning(
            "outbox.no_relay_for_schema",
            schema=outbox.schema,
            hint=(
                f"relays run in this database, but none serves schema {outbox.schema!r}: "
                "the events published here wait until one does. Give this process and "
                "the relays the same POSTROOM_SCHEMA (`postroom check` lists the schemas "
                "with waiting rows and no relay)"
            ),
        )
