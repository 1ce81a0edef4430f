"""Broker edges (issue 12, finding 6): the batched publish path, repeated message ids.

Against real RabbitMQ and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aio_pika
import pytest
from sqlalchemy import text

import postroom
from postroom import rabbit
from postroom import worker as worker_module
from postroom.message import Message, uuid7
from postroom.metrics import Metrics
from postroom.outage import is_outage
from postroom.relay import Relay
from postroom.subscriber import Subscriber
from postroom.worker import DEAD_QUEUE_BUG_LIMIT, Worker
from tests.helpers import bind_queue, collect, eventually, running_worker


class Parcel(postroom.Event, topic="edges.parcel"):
    n: int


async def test_the_batched_publish_path_is_the_one_in_use(settings, amqp_url):
    """aiormq is pinned because the publisher reads its channel tables: if an aiormq
    release renames them, the publisher silently falls back to a slower path. This test
    fails instead."""
    connection = await rabbit.connect(amqp_url, name="postroom-test")
    try:
        publisher = await rabbit.ConfirmingPublisher.open(connection)
        assert publisher.batched, "aiormq's channel tables changed: batched publishing is off"
        await publisher.close()
    finally:
        await connection.close()
    metrics = Metrics()
    await Relay(settings, metrics=metrics).run_until_idle(timeout=30)
    assert metrics.registry.get_sample_value("postroom_relay_batched_publish") == 1.0


@pytest.mark.parametrize("unroutable_first", [True, False])
async def test_one_batch_with_a_repeated_message_id_books_the_return_on_its_row(
    settings, sessions, amqp, names, unroutable_first
):
    """Two outbox rows with one message id (a retry of one event for two consumers) in
    one batch, one of them unroutable: that one stays with its error, the other is
    delivered. (Keyed by message id, the return was booked against the other row and the
    unroutable one deleted as published.)"""
    queue = await bind_queue(amqp, settings.exchange, [Parcel.topic], f"q.{names}")
    message = Message(
        message_id=uuid7(),
        topic=Parcel.topic,
        body=Parcel(n=1).model_dump_json().encode(),
        occurred_at=datetime.now(UTC),
    )
    box = postroom.Outbox.from_settings(settings)
    nowhere = f"no-such-queue.{names}"
    async with sessions() as session, session.begin():
        routes = [("", nowhere), (None, Parcel.topic)]
        for exchange, routing_key in routes if unroutable_first else routes[::-1]:
            await box.write(session, message, exchange=exchange, routing_key=routing_key)
    relay = Relay(settings)
    await relay.run_until_idle(timeout=30)
    got = await collect(settings.amqp_url.get_secret_value(), queue, count=1, settle=0.5)
    assert [m.message_id for m in got] == [str(message.message_id)]
    async with sessions() as session:
        rows = (
            await session.execute(
                text(
                    f'SELECT routing_key, attempts, last_error FROM "{settings.schema_name}".outbox'
                )
            )
        ).all()
    assert len(rows) == 1, rows
    routing_key, attempts, last_error = rows[0]
    assert (routing_key, attempts) == (nowhere, 1)
    assert "unroutable" in last_error
    assert (relay.stats.published, relay.stats.failed) == (1, 1)


async def test_a_dead_queue_message_the_worker_cannot_record_stops_circulating(
    settings, names, monkeypatch
):
    """`.dead` queues have no delivery limit behind them: a message the worker cannot
    record (a bug) would be requeued forever. The worker holds it after a few tries."""
    router = postroom.Router()
    name = f"edges.{names}"

    @router.consumer(name, Parcel)
    async def handle(event: Parcel, ctx: postroom.Context) -> None:
        pass

    attempts = 0

    async def cannot_record(*_: object) -> object:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("injected bug while recording a broker dead letter")

    monkeypatch.setattr(worker_module, "record_broker_dead_letter", cannot_record)
    worker = Worker(settings, router)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        await eventually(lambda: worker.ready or task.done(), timeout=20)
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"n": 1}', message_id=str(uuid7()), type=Parcel.topic),
            routing_key=f"{name}.dead",
        )
        await eventually(lambda: attempts >= DEAD_QUEUE_BUG_LIMIT, timeout=30)
        await asyncio.sleep(1.5)  # longer than the last backoff: no further delivery
        assert attempts == DEAD_QUEUE_BUG_LIMIT
        assert worker.stats.bugs == DEAD_QUEUE_BUG_LIMIT
        stop.set()
        await asyncio.wait_for(task, 30)
        # Held, not dropped: back in its queue once the worker let go of it.
        declared = await channel.declare_queue(f"{name}.dead", passive=True)
        assert declared.declaration_result.message_count == 1
    finally:
        stop.set()
        if not task.done():
            await asyncio.wait_for(task, 30)
        channel = await connection.channel()
        for queue in (name, f"{name}.dead"):
            await channel.queue_delete(queue)
        await connection.close()


async def test_coalesced_acks_never_cover_a_delivery_still_in_hand(settings, amqp, names):
    """The subscriber acks the settled run with one multiple=True ack: a delivery still in
    hand (here the third) must stay unacked, and a reject must not be swallowed by it."""
    queue = await bind_queue(amqp, settings.exchange, [Parcel.topic], f"acks.{names}")
    channel = await amqp.channel()
    exchange = await channel.get_exchange(settings.exchange, ensure=False)
    for n in range(6):
        await exchange.publish(aio_pika.Message(str(n).encode()), routing_key=Parcel.topic)
    connection = await rabbit.connect(settings.amqp_url.get_secret_value(), name="postroom-test")
    try:
        subscriber = await Subscriber.open(
            await rabbit.open_channel(connection), prefetch=10, on_close=lambda _: None
        )
        got: dict[bytes, int] = {}
        await subscriber.consume(queue, lambda delivery, tag: got.update({delivery.body: tag}))
        await eventually(lambda: len(got) == 6, timeout=10)
        for body in (b"0", b"1", b"3", b"5"):
            subscriber.ack(got[body])
        subscriber.reject(got[b"4"], requeue=False)  # dropped (no dead-letter exchange here)
        await subscriber.flush()
        # b"2" is still in hand: closing the channel must return it, and only it.
        await subscriber.close()
    finally:
        await connection.close()
    left = await collect(settings.amqp_url.get_secret_value(), queue, count=1, settle=0.5)
    assert [m.body for m in left] == [b"2"]


async def test_a_consumer_the_broker_cancels_is_consumed_again(settings, names, amqp):
    """The broker may cancel a consumer (basic.cancel: its queue deleted, a queue member
    gone). aiormq only logs it; the worker then kept its channel open, consuming nothing
    from that queue while /readyz said ready. Now a cancel is a lost channel: the worker
    reconnects, declares its queues again and consumes them."""
    router = postroom.Router()
    name = f"edges.{names}"
    handled: list[int] = []

    @router.consumer(name, Parcel)
    async def handle(event: Parcel, ctx: postroom.Context) -> None:
        handled.append(event.n)

    channel = await amqp.channel()
    try:
        async with running_worker(settings, router) as worker:
            queue = await channel.declare_queue(name, passive=True)
            assert queue.declaration_result.consumer_count == 1  # precondition: consuming
            reconnects = worker.stats.reconnects
            await channel.queue_delete(name)  # the broker cancels the worker's consumer

            async def consumed_again() -> bool:
                probe = await amqp.channel()
                try:
                    declared = await probe.declare_queue(name, passive=True)
                except aio_pika.exceptions.ChannelClosed:
                    return False  # not declared again yet
                finally:
                    if not probe.is_closed:
                        await probe.close()
                return declared.declaration_result.consumer_count == 1 and worker.ready

            await eventually(consumed_again, timeout=30)
            assert worker.stats.reconnects > reconnects
            exchange = await channel.get_exchange(settings.exchange, ensure=False)
            await exchange.publish(
                aio_pika.Message(
                    b'{"n": 7}',
                    message_id=str(uuid7()),
                    type=Parcel.topic,
                    content_type="application/json",
                ),
                routing_key=Parcel.topic,
            )
            await eventually(lambda: handled == [7], timeout=20)
    finally:
        for queue_name in (name, f"{name}.dead"):
            await channel.queue_delete(queue_name)
        await channel.close()


async def test_a_channel_asked_of_a_connection_closed_under_us_is_an_outage(amqp_url):
    """aiormq answers a channel request on a connection it already closed (a broker node
    stopped between two steps of a session) with a bare RuntimeError, which
    ``is_outage`` took for a bug: the queue watcher logged it at ERROR with a traceback
    in the cluster runs, and a worker declaring its queues at that moment would have
    exited. Every channel postroom opens goes through ``rabbit.open_channel``, which
    reports it as :class:`rabbit.ConnectionGone`, an outage."""
    connection = await rabbit.connect(amqp_url, name="postroom-test")
    try:
        await connection.transport.connection.close()  # closed under aio-pika
        with pytest.raises(Exception) as opening:
            await rabbit.open_channel(connection)
        assert isinstance(opening.value, rabbit.ConnectionGone), repr(opening.value)
        assert is_outage(opening.value)
        with pytest.raises(rabbit.ConnectionGone):
            await rabbit.ready_messages(connection, ["any"])
    finally:
        await connection.close()


async def test_a_request_cut_off_by_a_reasonless_close_is_an_outage(amqp_url):
    """When aiormq's reader meets the end of the stream between two frames (which a TLS
    connection cut inside a record turns into: the partial record is dropped), it closes
    the connection without a reason and fails every pending request with a bare
    ``Exception``. A worker subscribing at that moment exited on it (found by the
    every-kind run on TLS); it is an outage."""
    connection = await rabbit.connect(amqp_url, name="postroom-test")
    try:
        channel = await rabbit.open_channel(connection)
        raw = await channel.get_underlay_channel()
        pending = asyncio.ensure_future(raw.queue_declare("postroom-test-never", passive=True))
        await asyncio.sleep(0)  # the request is in flight
        await connection.transport.connection.close(None)  # what a clean EOF leads to
        with pytest.raises(Exception) as cut_off:
            await pending
        assert type(cut_off.value) is Exception  # precondition: the reasonless failure
        assert is_outage(cut_off.value)
        assert not is_outage(Exception())  # a handler's bare Exception is not
    finally:
        await connection.close()
