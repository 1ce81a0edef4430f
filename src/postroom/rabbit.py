"""What speaks AMQP: connections, topology and the confirming publisher.

With :mod:`postroom.subscriber`, the only module that imports aio-pika/aiormq, so
``import postroom`` in a web process that only publishes to the outbox never loads a
broker client.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, ExchangeType
from aiormq.abc import ChannelFrame, FieldTable
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from postroom.broker import Broker
from postroom.errors import TopologyMismatchError, TopologyRefusedError

PERSISTENT = 2
QUORUM = "quorum"

BrokerError = aiormq.exceptions.AMQPError
"""Base of every broker-side failure (connection, channel, protocol); an outage to retry."""

ChannelGone = aiormq.exceptions.ChannelInvalidStateError
"""Raised when a channel that already closed is used (e.g. the broker closed the connection
between two relay batches). aiormq derives it from RuntimeError, not from AMQPError, yet it
is an outage to retry like any other lost connection."""


class ConnectionGone(aiormq.exceptions.AMQPConnectionError):
    """A channel was asked of a connection that had closed under us (an outage).

    aiormq answers that with a bare ``RuntimeError``, which says nothing about who
    raised it; :func:`open_channel` turns it into this when the connection is closed."""


async def open_channel(
    connection: AbstractConnection, *, publisher_confirms: bool = False, **options: Any
) -> AbstractChannel:
    """Open a channel on *connection*: the one way postroom opens channels.

    Raises :class:`ConnectionGone` (an outage) if the connection closed before the
    channel opened, e.g. a broker node stopped between two steps of a session.
    """
    try:
        return await connection.channel(publisher_confirms=publisher_confirms, **options)
    except RuntimeError as exc:
        if isinstance(exc, ChannelGone) or not _closed(connection):
            raise
        raise ConnectionGone(f"the connection closed before a channel opened: {exc}") from exc


def _closed(connection: AbstractConnection) -> bool:
    # aio-pika learns of a close from aiormq a loop turn or more later: ask both.
    underlying = getattr(getattr(connection, "transport", None), "connection", None)
    return connection.is_closed or bool(underlying is not None and underlying.is_closed)


async def connect(broker: Broker | str, *, name: str, timeout: float = 10.0) -> AbstractConnection:
    """Open a plain (non-robust) connection; callers own reconnection explicitly.

    *broker* is ``settings.broker`` (its TLS context verifies ``amqps://`` peers); a bare
    URL is parsed as one with no TLS files, so it verifies against the system store.
    A broker listing several URLs (the nodes of a cluster) is tried in a random order,
    which spreads clients over the nodes, and the first that accepts wins; when none
    does, the last one's error is raised. Callers reconnect by calling this again, so a
    client whose node went away fails over to another one.
    """
    if isinstance(broker, str):
        broker = Broker.parse(broker)
    order = random.sample(urls := broker.urls, len(urls))
    properties: FieldTable = {"connection_name": name}
    for url in order[:-1]:
        try:
            return await aio_pika.connect(
                url, timeout=timeout, ssl_context=broker.ssl_context, client_properties=properties
            )
        except (OSError, TimeoutError, BrokerError):
            continue  # the next node; the last one's error is the caller's
    return await aio_pika.connect(
        order[-1], timeout=timeout, ssl_context=broker.ssl_context, client_properties=properties
    )


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A consumer's queue: bound to its topics, quorum, with a broker delivery limit."""

    name: str
    topics: tuple[str, ...]
    delivery_limit: int
    single_active_consumer: bool = False

    @property
    def dead_queue(self) -> str:
        """The queue the broker dead-letters to when the delivery limit is reached."""
        return f"{self.name}.dead"

    def arguments(self, dead_letter_exchange: str) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": QUORUM,
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": dead_letter_exchange,
            "x-dead-letter-routing-key": self.name,
        }
        if self.single_active_consumer:
            args["x-single-active-consumer"] = True
        return args


async def declare_exchange(connection: AbstractConnection, name: str) -> None:
    """Declare the durable topic exchange events are published to."""
    await _declare(connection, "exchange", name, _exchange(name, ExchangeType.TOPIC))


async def declare_queues(
    connection: AbstractConnection,
    *,
    exchange: str,
    dead_letter_exchange: str,
    queues: Sequence[QueueSpec],
) -> None:
    """Declare the events exchange, the dead-letter exchange and every consumer's queues.

    Idempotent. A queue that exists with other arguments raises
    :class:`TopologyMismatchError` naming the queue and the broker's complaint.
    """
    await declare_exchange(connection, exchange)
    await _declare(
        connection,
        "exchange",
        dead_letter_exchange,
        _exchange(dead_letter_exchange, ExchangeType.DIRECT),
    )
    for queue in queues:
        dead_args = {"x-queue-type": QUORUM}
        await _declare(connection, "queue", queue.dead_queue, _queue(queue.dead_queue, dead_args))
        await _declare(
            connection,
            "queue",
            queue.name,
            _queue(queue.name, queue.arguments(dead_letter_exchange)),
        )
        channel = await open_channel(connection)
        try:
            dead = await channel.get_queue(queue.dead_queue, ensure=False)
            await dead.bind(dead_letter_exchange, routing_key=queue.name)
            live = await channel.get_queue(queue.name, ensure=False)
            for topic in queue.topics:
                await live.bind(exchange, routing_key=topic)
        finally:
            await channel.close()


async def queue_depths(connection: AbstractConnection, names: Sequence[str]) -> int:
    """Return how many ready messages the queues *names* hold together (passive declare)."""
    channel = await open_channel(connection)
    try:
        total = 0
        for name in names:
            declared = await channel.declare_queue(name, passive=True)
            total += declared.declaration_result.message_count or 0
        return total
    finally:
        if not channel.is_closed:
            await channel.close()


def _exchange(name: str, kind: ExchangeType) -> Any:
    async def declare(channel: AbstractChannel) -> None:
        await channel.declare_exchange(name, kind, durable=True)

    return declare


def _queue(name: str, arguments: Mapping[str, Any]) -> Any:
    async def declare(channel: AbstractChannel) -> None:
        await channel.declare_queue(name, durable=True, arguments=dict(arguments))

    return declare


async def _declare(connection: AbstractConnection, kind: str, name: str, declare: Any) -> None:
    # A failed declare closes its channel (406), so each one gets a channel of its own.
    channel = await open_channel(connection)
    try:
        await declare(channel)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyMismatchError(kind, name, str(exc)) from None
    finally:
        if not channel.is_closed:
            await channel.close()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message ready for the wire; built by the relay from an outbox row."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    topic: str
    timestamp: datetime
    content_type: str
    correlation_id: str | None
    headers: Mapping[str, Any]


class ConfirmsOverdue(aiormq.exceptions.AMQPError):
    """The broker took a batch but did not confirm it in time; an outage like a lost link."""


class Unroutable(Exception):
    """The broker returned a mandatory message: no queue is bound for its routing key."""


class Refused(Exception):
    """The broker nacked the message (e.g. a queue limit or a resource alarm)."""


class ConfirmingPublisher:
    """Publish batches with confirms in flight and ``mandatory`` on a single channel.

    Uses the aiormq channel under aio-pika directly. A batch goes out as one socket
    write: its frames are marshalled together and each message's confirmation future
    is registered in the channel's own tables, so aiormq's reader resolves acks,
    nacks and returns exactly as for its ``basic_publish``. Per message that saves a
    task, a lock round, a queue hand-off, a ``send()`` and a drain: the relay's CPU
    per message fell by about two thirds (docs/performance.md). If the aiormq in use
    lacks those tables, publishing falls back to one ``basic_publish`` per message
    (:attr:`batched` says which path is in use; aiormq is pinned in pyproject.toml to
    the range tested, and a test fails if the batched path is not the one in use).

    A Basic.Return names the message only by its ``message_id`` (aiormq maps it to a
    delivery tag), so two messages with one id in flight at once could have a return
    booked against the wrong one. :meth:`publish_many` therefore never has two of the
    same id awaiting confirmation: a batch is sent in runs of distinct ids, each run
    confirmed before the next (in order, so key order holds).
    """

    _CHANNEL_TABLES = (
        "confirmations",
        "message_id_delivery_tag",
        "delivery_tag",
        "write_queue",
        "max_content_size",
        "number",
    )

    def __init__(self, channel: AbstractChannel, raw: aiormq.abc.AbstractChannel) -> None:
        self._channel = channel
        self._raw = raw
        self._batched = all(hasattr(raw, name) for name in self._CHANNEL_TABLES)

    @property
    def batched(self) -> bool:
        """True if batches go out as one write (aiormq's channel tables are as expected)."""
        return self._batched

    @classmethod
    async def open(cls, connection: AbstractConnection) -> ConfirmingPublisher:
        channel = await open_channel(connection, publisher_confirms=True, on_return_raises=True)
        return cls(channel, await channel.get_underlay_channel())

    @property
    def is_open(self) -> bool:
        return not self._channel.is_closed

    async def publish_many(
        self, messages: Sequence[Outgoing], *, timeout: float = 30.0
    ) -> list[BaseException | None]:
        """Publish *messages* in order; return, per message, None or why it failed.

        Order on the wire is the order given (one channel, one write under the channel
        lock), which is what per-key ordering relies on. Raises on connection or
        channel loss or after *timeout*: then no result is known and the caller must
        treat the whole batch as unpublished.
        """
        results: list[BaseException | object] = []
        try:
            for run in _distinct_runs(messages):
                if self._batched:
                    results += await self._publish_batch(run, timeout)
                else:
                    results += await asyncio.gather(
                        *(self._publish_one(message, timeout) for message in run),
                        return_exceptions=True,
                    )
        except TimeoutError:
            raise ConfirmsOverdue(
                f"no confirms for {len(messages)} messages in {timeout}s"
            ) from None
        outcomes: list[BaseException | None] = []
        for result in results:
            if isinstance(result, aiormq.exceptions.PublishError):
                outcomes.append(Unroutable(f"unroutable (no queue bound): {result}"))
            elif isinstance(result, aiormq.exceptions.DeliveryError):
                outcomes.append(Refused(f"nacked by the broker: {result!r}"))
            elif isinstance(result, TimeoutError):
                raise ConfirmsOverdue(f"no confirm within {timeout}s") from result
            elif isinstance(result, BaseException):
                # Channel or connection trouble: nothing in this batch is known published.
                raise result
            elif isinstance(result, spec.Basic.Ack):
                outcomes.append(None)
            else:
                outcomes.append(Refused(f"unexpected confirmation {result!r}"))
        return outcomes

    async def _publish_batch(
        self, messages: Sequence[Outgoing], timeout: float
    ) -> list[BaseException | object]:
        raw: Any = self._raw
        limit = raw.max_content_size
        frames: list[Any] = []
        # Method frames are reused per route: pamqp validates names on construction.
        methods: dict[tuple[str, str], Any] = {}
        for message in messages:
            body = message.body
            route = (message.exchange, message.routing_key)
            method = methods.get(route)
            if method is None:
                method = methods[route] = spec.Basic.Publish(
                    exchange=route[0], routing_key=route[1], mandatory=True
                )
            frames.append(method)
            frames.append(ContentHeader(properties=_properties(message), body_size=len(body)))
            if len(body) < limit:
                frames.append(ContentBody(body))
            else:
                frames.extend(ContentBody(body[i : i + limit]) for i in range(0, len(body), limit))
        confirmations: list[asyncio.Future[Any]] = []
        async with asyncio.timeout(timeout):
            async with raw.lock:
                first_tag = raw.delivery_tag + 1
                # Plain futures, one guard in the channel's store: aiormq rejects the
                # futures of its store when the channel closes, and registering every
                # confirmation there costs more than building its frames.
                loop = asyncio.get_running_loop()
                closed = raw.create_future()
                for offset, message in enumerate(messages):
                    future = loop.create_future()
                    raw.confirmations[first_tag + offset] = future
                    raw.message_id_delivery_tag[message.message_id] = first_tag + offset
                    confirmations.append(future)
                raw.delivery_tag += len(messages)
                drained = raw.create_future()
                frame = ChannelFrame.marshall(
                    channel_number=raw.number, frames=frames, drain_future=drained
                )
                try:
                    await raw.write_queue.put(frame)
                except BaseException:
                    # Never handed to the writer: the broker has not seen these tags.
                    raw.delivery_tag = first_tag - 1
                    closed.cancel()
                    self._forget(messages, first_tag, confirmations)
                    raise
                await drained
            confirmed = asyncio.gather(*confirmations, return_exceptions=True)
            try:
                await asyncio.wait((confirmed, closed), return_when=asyncio.FIRST_COMPLETED)
                if not confirmed.done():  # the channel or connection closed
                    reason = None if closed.cancelled() else closed.exception()
                    if isinstance(reason, BrokerError):
                        raise reason
                    raise aiormq.exceptions.AMQPChannelError(
                        f"channel closed with {len(messages)} confirms pending ({reason!r})"
                    ) from reason
                results: list[BaseException | object] = confirmed.result()
                return results
            finally:
                closed.cancel()
                self._forget(messages, first_tag, confirmations)

    def _forget(
        self, messages: Sequence[Outgoing], first_tag: int, futures: list[asyncio.Future[Any]]
    ) -> None:
        raw: Any = self._raw
        for offset, (message, future) in enumerate(zip(messages, futures, strict=True)):
            tag = first_tag + offset
            if raw.message_id_delivery_tag.get(message.message_id) == tag:
                del raw.message_id_delivery_tag[message.message_id]
            if not future.done():
                raw.confirmations.pop(tag, None)
                future.cancel()

    async def _publish_one(self, message: Outgoing, timeout: float) -> Any:
        return await self._raw.basic_publish(
            message.body,
            exchange=message.exchange,
            routing_key=message.routing_key,
            properties=_properties(message),
            mandatory=True,
            timeout=timeout,
        )

    async def close(self) -> None:
        if not self._channel.is_closed:
            await self._channel.close()


def _distinct_runs(messages: Sequence[Outgoing]) -> list[Sequence[Outgoing]]:
    """Split *messages*, in order, into runs in which no message id appears twice."""
    runs: list[Sequence[Outgoing]] = []
    start = 0
    ids: set[str] = set()
    for index, message in enumerate(messages):
        if message.message_id in ids:
            runs.append(messages[start:index])
            start, ids = index, set()
        ids.add(message.message_id)
    if start < len(messages):
        runs.append(messages[start:])
    return runs


def _properties(message: Outgoing) -> Any:
    return spec.Basic.Properties(
        content_type=message.content_type,
        delivery_mode=PERSISTENT,
        correlation_id=message.correlation_id,
        message_id=message.message_id,
        timestamp=message.timestamp,
        message_type=message.topic,
        headers=dict(message.headers),
    )


@dataclass(frozen=True, slots=True)
class QueueState:
    """A queue as the broker reports it to a passive declare."""

    name: str
    exists: bool
    messages: int = 0
    consumers: int = 0


@contextlib.asynccontextmanager
async def _raw_channel(connection: AbstractConnection) -> AsyncIterator[Any]:
    """Yield aiormq's channel under a channel of its own: a failed declare closes it."""
    channel = await open_channel(connection)
    try:
        yield await channel.get_underlay_channel()
    finally:
        if not channel.is_closed:
            await channel.close()


async def queue_state(connection: AbstractConnection, name: str) -> QueueState:
    """Look a queue up without creating it (a passive declare)."""
    try:
        async with _raw_channel(connection) as raw:
            ok = await raw.queue_declare(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return QueueState(name, exists=False)
    return QueueState(name, True, ok.message_count or 0, ok.consumer_count or 0)


async def exchange_exists(connection: AbstractConnection, name: str) -> bool:
    """Return True if exchange *name* exists (a passive declare; nothing is created)."""
    try:
        async with _raw_channel(connection) as raw:
            await raw.exchange_declare(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    return True


async def delete_queue(connection: AbstractConnection, name: str, *, force: bool) -> int:
    """Delete queue *name* (and so its bindings); return the messages deleted with it.

    Quorum queues do not support the broker's ``if-empty`` flag (RabbitMQ answers
    NOT_IMPLEMENTED and closes the connection), so unless *force* is set the queue is
    looked at just before the delete and one holding messages or consumers raises
    TopologyRefusedError. A message published in between those two steps is lost with
    the queue: stop the producers of a queue before deleting it.
    """
    if not force:
        state = await queue_state(connection, name)
        if state.messages or state.consumers:
            raise TopologyRefusedError(
                "queue", name, f"{state.messages} messages, {state.consumers} consumers"
            )
    async with _raw_channel(connection) as raw:
        ok = await raw.queue_delete(name)
    return int(ok.message_count or 0)


async def delete_exchange(connection: AbstractConnection, name: str, *, if_unused: bool) -> None:
    """Delete exchange *name*; with *if_unused* the broker refuses one a queue is bound to."""
    try:
        async with _raw_channel(connection) as raw:
            await raw.exchange_delete(name, if_unused=if_unused)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyRefusedError("exchange", name, str(exc)) from None


async def ready_messages(connection: AbstractConnection, queues: Sequence[str]) -> dict[str, int]:
    """Return how many messages wait (ready, unacked not counted) in each of *queues*.

    Passive declares on one channel; a queue that does not exist closes that channel
    (404), is left out of the answer and the next queue gets a fresh channel.
    """
    depths: dict[str, int] = {}
    channel = await open_channel(connection)
    try:
        for name in queues:
            if channel.is_closed:
                channel = await open_channel(connection)
            try:
                declared = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue
            depths[name] = int(declared.declaration_result.message_count or 0)
    finally:
        if not channel.is_closed:
            await channel.close()
    return depths
