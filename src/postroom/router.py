"""Consumers: a name, the event type it handles, a handler and its retry policy.

Names are identities: they name the queue, the inbox key and the dead letters, so
they are explicit strings, never derived from function names.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

from postroom.errors import PostroomError
from postroom.events import Event, topic_of
from postroom.message import HeaderValue, Message
from postroom.redaction import Redaction
from postroom.tracing import child_traceparent, current_traceparent

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    from postroom.outbox import Outbox

E = TypeVar("E", bound=Event)
Handler = Callable[[E, "Context"], Awaitable[None]]
BatchHandler = Callable[[list[E], "BatchContext"], Awaitable[None]]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,200}$")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a failing message is retried before it is dead.

    The delay before attempt n+1 is ``min(cap, base * 2**(n-1))``, half of it fixed and
    half random ("equal jitter"), so a burst of failures does not retry in lockstep.
    """

    max_attempts: int = 5
    base: timedelta = timedelta(seconds=1)
    cap: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise PostroomError("max_attempts must be at least 1")
        if self.base <= timedelta(0) or self.cap < self.base:
            raise PostroomError("backoff needs 0 < base <= cap")

    def delay(self, attempt: int) -> timedelta:
        """Return the delay before the attempt after *attempt* (1-based)."""
        factor: int = 1 << min(attempt - 1, 30)
        full = min(self.cap, self.base * factor)
        return full / 2 + full / 2 * random.random()


@dataclass(frozen=True, slots=True)
class Consumer(Generic[E]):
    """One registration: what a worker subscribes to and how it handles it."""

    name: str
    event_type: type[E]
    handler: Handler[E]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    ordered: bool = False
    publishes: tuple[type[Event], ...] = ()
    """Events the handler may publish; declared for documentation (``postroom asyncapi``)."""
    redaction: Redaction | None = None
    """What of a failed message is dropped or masked before it is stored as a dead letter."""
    batch_handler: BatchHandler[E] | None = None
    """Set for ``batch=True``: the handler taking a whole batch. :attr:`handler` is then
    the same handler called with a list of one (what a one-message dispatch runs)."""

    @property
    def topics(self) -> tuple[str, ...]:
        return (topic_of(self.event_type),)


class Router:
    """A set of consumers, declared with :meth:`consumer` and run by ``postroom worker``."""

    def __init__(self, *, redact: Redaction | None = None) -> None:
        """*redact* applies to every consumer that declares no redaction of its own."""
        self._consumers: dict[str, Consumer[Any]] = {}
        self._redact = redact

    @overload
    def consumer(
        self,
        name: str,
        event_type: type[E],
        *,
        max_attempts: int = ...,
        backoff: timedelta = ...,
        backoff_cap: timedelta = ...,
        ordered: bool = ...,
        publishes: Sequence[type[Event]] = ...,
        redact: Redaction | None = ...,
        batch: Literal[False] = ...,
    ) -> Callable[[Handler[E]], Handler[E]]: ...

    @overload
    def consumer(
        self,
        name: str,
        event_type: type[E],
        *,
        max_attempts: int = ...,
        backoff: timedelta = ...,
        backoff_cap: timedelta = ...,
        ordered: Literal[False] = ...,
        publishes: Sequence[type[Event]] = ...,
        redact: Redaction | None = ...,
        batch: Literal[True],
    ) -> Callable[[BatchHandler[E]], BatchHandler[E]]: ...

    def consumer(
        self,
        name: str,
        event_type: type[E],
        *,
        max_attempts: int = 5,
        backoff: timedelta = timedelta(seconds=1),
        backoff_cap: timedelta = timedelta(minutes=5),
        ordered: bool = False,
        publishes: Sequence[type[Event]] = (),
        redact: Redaction | None = None,
        batch: bool = False,
    ) -> Callable[[Any], Any]:
        """Register the decorated coroutine as consumer *name* of *event_type*.

        *ordered* consumers get a single-active-consumer queue and handle messages of one
        ordering key one at a time, in queue order (a retry still steps out of line).
        *publishes* lists the events the handler publishes, for the AsyncAPI document;
        it is not enforced. *redact* says what of a failed message is dropped or masked
        before it is stored as a dead letter (default: the router's).

        *batch*: the handler takes the whole batch the worker took
        (``POSTROOM_WORKER_BATCH_SIZE``), ``async def h(events: list[E], ctx:
        BatchContext)``, so it can write all rows with one statement. The guarantees
        are the per-event ones (see :class:`BatchContext`); the price: if the handler
        raises, the batch is rolled back and every message handled again alone.
        """
        if not _NAME.match(name):
            raise PostroomError(f"consumer name {name!r} must match {_NAME.pattern}")
        if name in self._consumers:
            raise PostroomError(f"consumer {name!r} is registered twice")
        if batch and ordered:
            raise PostroomError(
                f"consumer {name!r}: batch=True cannot be ordered=True: an ordered consumer "
                "handles one message of a key at a time, so its batches would hold one message"
            )
        topic_of(event_type)  # fail at import time, not at the first message
        for published in publishes:
            topic_of(published)
        policy = RetryPolicy(max_attempts=max_attempts, base=backoff, cap=backoff_cap)
        redaction = redact or self._redact

        def register(handler: Handler[E]) -> Handler[E]:
            self._consumers[name] = Consumer(
                name, event_type, handler, policy, ordered, tuple(publishes)
            )
            if redaction is not None:
                self._consumers[name] = replace(self._consumers[name], redaction=redaction)
            return handler

        def register_batch(handler: BatchHandler[E]) -> BatchHandler[E]:
            register(_one_of(handler))
            self._consumers[name] = replace(self._consumers[name], batch_handler=handler)
            return handler

        return register_batch if batch else register

    def include(self, other: Router) -> None:
        """Add every consumer of *other* (for routers split across modules)."""
        for consumer in other:
            if consumer.name in self._consumers:
                raise PostroomError(f"consumer {consumer.name!r} is registered twice")
            self._consumers[consumer.name] = consumer

    def __iter__(self) -> Iterator[Consumer[Any]]:
        return iter(self._consumers.values())

    def __len__(self) -> int:
        return len(self._consumers)

    def __getitem__(self, name: str) -> Consumer[Any]:
        return self._consumers[name]


class Context:
    """What a handler gets besides its event: the transaction and the message's facts.

    Everything written through :attr:`connection`, :attr:`session` and :meth:`publish`
    commits together with the inbox row, or not at all. :attr:`connection` is the fast
    handle (SQLAlchemy Core or ``text()``) on the connection of the message's
    transaction: no ORM session is made unless the handler touches :attr:`session`,
    which joins that same transaction at first use (pending ORM changes are flushed
    before the commit). postroom drives that transaction on the driver connection, so
    :attr:`connection` reports AUTOCOMMIT and its ``commit()``/``rollback()`` do nothing:
    raise to roll back. A database error the handler catches still aborts the
    transaction; the message is then a failed attempt (retried), never acked.
    """

    __slots__ = ("_session", "_sessions", "connection", "consumer", "message", "outbox")

    def __init__(
        self,
        *,
        connection: AsyncConnection,
        message: Message,
        consumer: str,
        outbox: Outbox,
        sessions: Callable[..., AsyncSession] | None = None,
    ) -> None:
        self.connection = connection
        self.message = message
        self.consumer = consumer
        self.outbox = outbox
        self._sessions = sessions
        self._session: AsyncSession | None = None

    @property
    def session(self) -> AsyncSession:
        """The ORM session in the message's transaction; never commit it yourself."""
        if self._session is None:
            from sqlalchemy.ext.asyncio import AsyncSession

            if self._sessions is not None:
                session = self._sessions(bind=self.connection)
            else:
                session = AsyncSession(bind=self.connection, expire_on_commit=False)
            # Join the connection's transaction now (no I/O), so publish() finds it open.
            session.sync_session.begin()
            self._session = session
        return self._session

    async def flush(self) -> None:
        """Flush the session's pending changes, if a session was made (dispatch calls it)."""
        if self._session is not None:
            await self._session.flush()

    async def release(self) -> None:
        """Close the session, if any; the transaction is the connection's (dispatch calls it)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @property
    def attempt(self) -> int:
        """1 on first delivery, then 2, 3, ... on retries."""
        return self.message.attempt

    async def publish(
        self,
        event: Event,
        *,
        key: str | None = None,
        delay: timedelta | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
    ) -> Message:
        """Publish a follow-up event in the handler's transaction, chaining causation."""
        incoming = self.message
        return await self.outbox.publish(
            self.session,
            event,
            key=key,
            delay=delay,
            headers=headers,
            correlation_id=incoming.correlation_id or str(incoming.message_id),
            causation_id=str(incoming.message_id),
            # The handler's span (OpenTelemetry), else the incoming trace continued.
            traceparent=current_traceparent() or child_traceparent(incoming.traceparent),
        )


def _one_of(handler: BatchHandler[E]) -> Handler[E]:
    """The batch *handler* as a per-event one: a list of one, the message's context.

    What a one-message dispatch runs: a batch's fallback after a failure, a worker
    with ``POSTROOM_WORKER_BATCH_SIZE=1``, a retry, ``postroom.testing.deliver``.
    """

    @functools.wraps(handler)  # its name and docstring (``postroom asyncapi``)
    async def one(event: E, ctx: Context) -> None:
        await handler([event], BatchContext(ctx, [ctx.message]))

    return one


class BatchContext:
    """What a batch handler gets besides its events: one transaction, each event's message.

    :attr:`messages` is aligned with the events (``messages[i]`` carried
    ``events[i]``); duplicates, undecodable, unknown-topic and too-large messages were
    taken out before the handler was called. Everything written through
    :attr:`connection`, :attr:`session` and :meth:`publish` commits together with the
    batch's inbox rows, or not at all. If the handler raises, the whole batch rolls back
    and each message is handled again alone (a list of one, a transaction of its own), so
    a poison message is retried or dead-lettered with its own reason while the others
    commit: the handler must tolerate running again, as after any crash.
    """

    __slots__ = ("_transaction", "messages")

    def __init__(self, transaction: Context, messages: Sequence[Message]) -> None:
        """*transaction* is the batch's transaction handle (its ``message`` unused)."""
        self._transaction = transaction
        self.messages = messages

    @property
    def connection(self) -> AsyncConnection:
        """The batch's transaction (SQLAlchemy Core or ``text()``): the fast handle."""
        return self._transaction.connection

    @property
    def session(self) -> AsyncSession:
        """An ORM session in the batch's transaction, made at first use; never commit it."""
        return self._transaction.session

    @property
    def consumer(self) -> str:
        return self._transaction.consumer

    @property
    def outbox(self) -> Outbox:
        return self._transaction.outbox

    async def publish(
        self,
        event: Event,
        *,
        cause: Message,
        key: str | None = None,
        delay: timedelta | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
    ) -> Message:
        """Publish a follow-up of *cause* (one of :attr:`messages`) in the batch's transaction.

        Causation and correlation are *cause*'s, as if its event had been handled alone;
        the follow-up continues *cause*'s trace (not the batch's span, which many traces
        share).
        """
        if not any(cause is m for m in self.messages):
            raise PostroomError(
                f"cause {cause.message_id} is not a message of this batch: pass one of "
                "ctx.messages, the one whose event this follows up"
            )
        return await self.outbox.publish(
            self.session,
            event,
            key=key,
            delay=delay,
            headers=headers,
            correlation_id=cause.correlation_id or str(cause.message_id),
            causation_id=str(cause.message_id),
            traceparent=child_traceparent(cause.traceparent),
        )
