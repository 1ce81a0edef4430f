"""Regression tests for bugs the fault scenarios (tests/test_faults.py) found.

Each test pins one bug down deterministically, without the randomness of a scenario.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg
import pytest
from pydantic import SecretStr
from sqlalchemy import text

from postroom import Outbox, Router, rabbit
from postroom.dispatch import Pipeline, dispatch
from postroom.failures import Outcome
from postroom.message import Delivery, Message, uuid7
from postroom.outage import is_outage
from postroom.router import Context
from postroom.worker import Worker
from tests.apps.faultapp import APPLY, Entry, router
from tests.faults import servers
from tests.faults.proxy import FaultProxy
from tests.faults.workload import declare_topology, prepare_schema, via
from tests.helpers import delete_queues, eventually, running_relay, running_worker


async def test_publishing_on_a_channel_the_broker_closed_is_an_outage(amqp_url, names):
    """Bug: after `close_all_connections` between two batches the relay exited with
    aiormq's ChannelInvalidStateError (a RuntimeError, not an AMQPError), instead of
    reconnecting like for any other broker outage."""
    connection = await rabbit.connect(amqp_url, name="postroom-test")
    try:
        await rabbit.declare_exchange(connection, f"ev.{names}")
        publisher = await rabbit.ConfirmingPublisher.open(connection)
        await servers.close_broker_connections(amqp_url)
        await eventually(lambda: not publisher.is_open, timeout=15)
        message = rabbit.Outgoing(
            exchange=f"ev.{names}",
            routing_key="t.x",
            body=b"{}",
            message_id="00000000-0000-7000-8000-000000000001",
            topic="t.x",
            timestamp=datetime.now(UTC),
            content_type="application/json",
            correlation_id=None,
            headers={},
        )
        with pytest.raises(Exception) as caught:
            await publisher.publish_many([message])
        assert is_outage(caught.value), f"{type(caught.value).__mro__} is not an outage"
    finally:
        if not connection.is_closed:
            await connection.close()


async def test_ordered_consumer_handover_keeps_key_order(settings, sessions):
    """Bug: a worker stopping (or reconnecting) cancelled its single-active-consumer
    subscription first and then drained. The broker handed the queue to the standby
    worker at once, while the first still held unacked messages of the key; the standby
    applied later messages before those came back (per-key order broken). Now an ordered
    queue is never cancelled and its unacked messages are never rejected one by one: the
    closing channel returns them all, in delivery order, before the standby starts.
    """
    amqp_url = settings.amqp_url.get_secret_value()
    await prepare_schema(settings.asyncpg_dsn, settings.schema_name)
    await delete_queues(amqp_url, router)
    small = settings.model_copy(update={"worker_prefetch": 4, "shutdown_timeout": 15.0})
    await declare_topology(small)
    box = Outbox.from_settings(small)
    async with sessions() as session, session.begin():
        for seq in range(1, 21):
            slow = 6.0 if seq == 1 else 0.0  # long enough to observe the state below
            await box.publish(session, Entry(key="k", seq=seq, sleep=slow), key="k")
    try:
        async with running_relay(small):
            first = Worker(small, router)
            stop_first = asyncio.Event()
            first_task = asyncio.create_task(first.run(stop_first))
            await eventually(lambda: first.ready)
            # The state under test: it holds seq 1..4 unacked, seq 1 in its slow handler.
            await eventually(lambda: _unacked(amqp_url, APPLY, 4), timeout=30)
            await eventually(lambda: _open_write_transaction(small), timeout=30)
            async with running_worker(small, router):
                stop_first.set()  # a rolling deploy: the first worker stops gracefully
                await asyncio.wait_for(first_task, 30)
                await eventually(lambda: _applied(sessions, small), timeout=30)
            order = await _applied(sessions, small)
    finally:
        await delete_queues(amqp_url, router)
    assert order == list(range(1, 21)), f"per-key commit order: {order}"


async def _applied(sessions, settings) -> list[int] | None:
    async with sessions() as session:
        result = await session.execute(
            text(
                f'SELECT seq FROM "{settings.schema_name}".fault_effects '
                f"WHERE consumer = '{APPLY}' ORDER BY position"
            )
        )
        seqs = [row[0] for row in result.all()]
    return seqs if len(seqs) == 20 else None


async def test_handler_losing_its_database_connection_is_requeued_not_retried(
    settings, engine, sessions
):
    """Bug: when the handler's transaction lost its connection (pg_terminate_backend, a
    server restart, a network cut) dispatch took it for a handler failure: it wrote a retry
    row (the message stepped out of key order) and burned an attempt (enough blips made a
    healthy message an 'exhausted' dead letter). Now dispatch raises, so the worker
    requeues, and the redelivery is attempt 1 again."""
    await prepare_schema(settings.asyncpg_dsn, settings.schema_name)
    calls: list[int] = []
    selfkill = Router()

    @selfkill.consumer("regress.selfkill", Entry, max_attempts=1)
    async def handler(event: Entry, ctx: Context) -> None:
        calls.append(ctx.attempt)
        if len(calls) == 1:  # the first time, our own backend is killed under us
            await ctx.session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    pipeline = Pipeline(
        sessions=sessions,
        outbox=Outbox.from_settings(settings),
        max_body_bytes=settings.max_body_bytes,
    )
    message = Message(
        message_id=uuid7(),
        topic=Entry.topic,
        body=Entry(key="k", seq=1).model_dump_json().encode(),
        occurred_at=datetime.now(UTC),
    )
    consumer = selfkill["regress.selfkill"]
    with pytest.raises(Exception) as caught:
        await dispatch(Delivery.of(message), consumer, pipeline)
    assert is_outage(caught.value)
    async with sessions() as session:
        schema = settings.schema_name
        outbox = await session.scalar(text(f'SELECT count(*) FROM "{schema}".outbox'))
        dead = await session.scalar(text(f'SELECT count(*) FROM "{schema}".dead_letters'))
    assert (outbox, dead) == (0, 0), "neither a retry row nor a dead letter"
    result = await dispatch(Delivery.of(message), consumer, pipeline)  # the redelivery
    assert result.outcome is Outcome.ACKED and calls == [1, 1]


async def test_hostile_envelopes_become_dead_letters_not_a_requeue_loop(settings, sessions):
    """Bug (found by the decoder fuzz): a message whose headers or properties held a NUL
    character or a non-finite float could not be stored (Postgres text and jsonb refuse
    them; jsonb also refuses NaN), and an infinite ``postroom-attempt`` escaped the
    decoder as OverflowError. dispatch raised, the worker requeued and reconnected, and
    got the same message first again: one hostile message stalled the consumer for
    good. Now such values are stored replaced, and every one of these is a dead letter
    (or a retry row) on the first delivery."""
    await prepare_schema(settings.asyncpg_dsn, settings.schema_name)
    failing = Router()

    @failing.consumer("regress.hostile", Entry, max_attempts=2)
    async def handler(event: Entry, ctx: Context) -> None:
        raise RuntimeError("fail, so a retry row with these headers is written")

    pipeline = Pipeline(
        sessions=sessions,
        outbox=Outbox.from_settings(settings),
        max_body_bytes=settings.max_body_bytes,
    )
    consumer = failing["regress.hostile"]
    good_body = Entry(key="k", seq=1).model_dump_json().encode()
    hostile = [
        Delivery(body=b"{}", message_id="nul\x00id", type="faults.entry"),
        Delivery(body=b"{}", message_id=None, type="t\x00pe", content_type="x\x00"),
        Delivery(
            body=b"x",
            message_id=str(uuid7()),
            type="faults.entry",
            content_type="application/json",
            headers={"k\x00": "v\x00", "nan": float("nan"), "deep": {"inf": float("inf")}},
        ),
        Delivery(
            body=good_body,
            message_id=str(uuid7()),
            type="faults.entry",
            content_type="application/json",
            headers={"postroom-attempt": float("inf"), "postroom-replays": float("inf")},
        ),
        Delivery(
            body=good_body,
            message_id=str(uuid7()),
            type="faults.entry",
            content_type="application/json",
            headers={"note": "a\x00b", "ratio": float("nan"), "postroom-replays": 10**30},
        ),
    ]
    outcomes = [(await dispatch(d, consumer, pipeline)).outcome for d in hostile]
    assert outcomes == [Outcome.DEAD] * 4 + [Outcome.RETRY]
    async with sessions() as session:
        schema = settings.schema_name
        dead = await session.scalar(text(f'SELECT count(*) FROM "{schema}".dead_letters'))
        retries = await session.scalar(text(f'SELECT count(*) FROM "{schema}".outbox'))
    assert (dead, retries) == (4, 1)


async def test_flapping_broker_link_does_not_burn_delivery_limits(settings, sessions):
    """Bug (found by the long mixed run, 123 healthy messages dead-lettered): when every
    new broker connection was cut shortly after it opened, the worker reconnected in a
    tight loop (its backoff only covered failed connects). Each cycle returned its
    prefetched messages and RabbitMQ counted every return towards x-delivery-limit, so
    within a second or two healthy messages became `delivery_limit` dead letters. Now
    short-lived sessions back off exponentially before reconnecting."""
    amqp_url = settings.amqp_url.get_secret_value()
    await prepare_schema(settings.asyncpg_dsn, settings.schema_name)
    await delete_queues(amqp_url, router)
    limited = settings.model_copy(update={"delivery_limit": 10, "worker_prefetch": 8})
    await declare_topology(limited)
    box = Outbox.from_settings(limited)
    async with sessions() as session, session.begin():
        for seq in range(1, 41):
            await box.publish(session, Entry(key=f"k{seq % 4}", seq=seq), key=f"k{seq % 4}")
    target = urlsplit(amqp_url)
    try:
        async with FaultProxy(target.hostname or "127.0.0.1", target.port or 5672) as proxy:
            proxied = limited.model_copy(update={"amqp_url": SecretStr(via(amqp_url, proxy))})
            async with running_relay(limited):
                await eventually(lambda: _outbox_empty(sessions, limited), timeout=30)
            proxy.cut_after(3000)  # every connection dies a few frames after its handshake
            worker = Worker(proxied, router)
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop))
            try:
                started = asyncio.get_running_loop().time()
                await eventually(lambda: worker.stats.reconnects >= 5, timeout=60)
                flapped_for = asyncio.get_running_loop().time() - started
                flaps = worker.stats.reconnects
                proxy.heal()
                await eventually(lambda: _settled(sessions, limited, 40), timeout=60)
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
    finally:
        await delete_queues(amqp_url, router)
    async with sessions() as session:
        reasons = (
            await session.execute(text(f'SELECT reason FROM "{limited.schema_name}".dead_letters'))
        ).all()
    assert reasons == [], f"healthy messages dead-lettered: {reasons} after {flaps} flaps"
    # Backing off, five reconnects take seconds; a tight loop flaps five times in well
    # under one (the reconnect itself is a few milliseconds on loopback).
    assert flapped_for >= 1.0, f"{flaps} reconnects in {flapped_for:.2f}s: no backoff"


async def _unacked(amqp_url: str, queue: str, count: int) -> bool:
    """*queue* has exactly *count* messages delivered and not yet acked (asked of the broker)."""
    out = await servers.run(
        servers.rabbitmqctl(),
        "list_queues",
        "-p",
        servers.vhost_of(amqp_url),
        "name",
        "messages_unacknowledged",
        "--formatter",
        "json",
    )
    return any(
        q["name"] == queue and q["messages_unacknowledged"] == count for q in json.loads(out)
    )


async def _open_write_transaction(settings) -> bool:
    """A worker backend of this database is inside a transaction that wrote (a handler)."""
    conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=10)
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'postroom-worker' AND backend_xid IS NOT NULL"
            )
        )
    finally:
        await conn.close()


async def _outbox_empty(sessions, settings) -> bool:
    async with sessions() as session:
        left = await session.scalar(text(f'SELECT count(*) FROM "{settings.schema_name}".outbox'))
    return left == 0


async def _settled(sessions, settings, count: int) -> bool:
    schema = settings.schema_name
    async with sessions() as session:
        seen = await session.scalar(
            text(
                f'SELECT count(*) FROM (SELECT consumer, message_id FROM "{schema}".fault_effects '
                f'UNION SELECT consumer, message_id::uuid FROM "{schema}".dead_letters) AS s'
            )
        )
    return seen == 2 * count
