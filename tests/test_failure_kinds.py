"""Outage, configuration, bug: the three kinds of failure, told apart (issue 12, finding 3).

Against real PostgreSQL and RabbitMQ. A database that is not migrated stops the worker
and the relay with one ConfigError: nothing requeued in a loop, nothing dead-lettered.
A bug inside postroom is logged at ERROR with its traceback and the message requeued,
while the database stays reported up and the other consumers keep flowing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest
import structlog
from pydantic import SecretStr
from sqlalchemy import text

import postroom
from postroom import Router, inbox, outage
from postroom.errors import ConfigError
from postroom.message import Delivery, Message
from postroom.metrics import Metrics
from postroom.relay import Relay
from postroom.router import Context
from postroom.settings import Settings
from postroom.worker import Worker
from tests.helpers import eventually


class Ping(postroom.Event, topic="kinds.ping"):
    n: int


class Pong(postroom.Event, topic="kinds.pong"):
    n: int


async def _put(settings: Settings, event: postroom.Event) -> Message:
    """Publish a postroom-shaped message straight to the exchange (no outbox, no relay)."""
    from datetime import UTC, datetime

    from postroom.message import uuid7

    message = Message(
        message_id=uuid7(),
        topic=type(event).topic,
        body=event.model_dump_json().encode(),
        occurred_at=datetime.now(UTC),
    )
    delivery = Delivery.of(message)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(settings.exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                delivery.body,
                message_id=delivery.message_id,
                type=delivery.type,
                content_type=delivery.content_type,
                timestamp=delivery.timestamp,
                headers=dict(delivery.headers),
            ),
            routing_key=message.topic,
        )
    finally:
        await connection.close()
    return message


async def _depth(settings: Settings, queue: str) -> int:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count: int = declared.declaration_result.message_count or 0
        return count
    finally:
        await connection.close()


async def _delete_queues(settings: Settings, router: Router) -> None:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        for consumer in router:
            for name in (consumer.name, f"{consumer.name}.dead"):
                await channel.queue_delete(name)
    finally:
        await connection.close()


async def test_worker_on_an_unmigrated_database_stops_with_one_config_error(settings, names):
    unmigrated = settings.model_copy(update={"schema_name": f"none_{names}"})
    router = Router()
    handled: list[int] = []

    @router.consumer(f"kinds.{names}.cfg", Ping)
    async def handle(event: Ping, ctx: Context) -> None:
        handled.append(event.n)

    worker = Worker(unmigrated, router)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        # It stops at start (reading the paused consumers) or at the first message:
        # either way one ConfigError, nothing handled, nothing dead, the message kept.
        await eventually(lambda: worker.ready or task.done(), timeout=20)
        await _put(unmigrated, Ping(n=1))
        with pytest.raises(ConfigError) as caught:
            await asyncio.wait_for(task, 20)
        assert "postroom migrate" in str(caught.value)
        assert f"none_{names}" in str(caught.value)
        assert handled == []
        # Requeued once (the closing channel returned it), not in a loop; never dead.
        assert worker.stats.requeued <= 1
        assert await _depth(unmigrated, f"kinds.{names}.cfg") == 1
        assert await _depth(unmigrated, f"kinds.{names}.cfg.dead") == 0
    finally:
        stop.set()
        if not task.done():
            await asyncio.wait_for(task, 20)
        await _delete_queues(unmigrated, router)


async def test_relay_on_an_unmigrated_database_stops_with_one_config_error(settings, names):
    unmigrated = settings.model_copy(update={"schema_name": f"none_{names}"})
    with pytest.raises(ConfigError) as caught:
        await asyncio.wait_for(Relay(unmigrated).run(asyncio.Event()), 20)
    assert "postroom migrate" in str(caught.value)


@pytest.mark.parametrize("batch_size", [1, 10])
async def test_a_bug_in_dispatch_is_logged_requeued_and_marks_nothing_down(
    settings, names, monkeypatch, batch_size
):
    router = Router()
    pongs: list[int] = []
    pings: list[int] = []

    @router.consumer(f"kinds.{names}.buggy", Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        pings.append(event.n)

    @router.consumer(f"kinds.{names}.fine", Pong)
    async def on_pong(event: Pong, ctx: Context) -> None:
        pongs.append(event.n)

    real_claim = inbox.claim
    real_claim_many = inbox.claim_many
    injected = 0

    async def buggy_claim(connection: Any, **kwargs: Any) -> bool:
        nonlocal injected
        if kwargs["consumer"].endswith(".buggy") and injected < 3:
            injected += 1
            # An OSError from a programming error must not pass for an outage.
            raise OSError(f"injected bug {injected}")
        return await real_claim(connection, **kwargs)

    async def buggy_claim_many(connection: Any, **kwargs: Any) -> Any:
        nonlocal injected
        if kwargs["consumer"].endswith(".buggy") and injected < 3:
            injected += 1
            raise OSError(f"injected bug {injected}")
        return await real_claim_many(connection, **kwargs)

    monkeypatch.setattr(inbox, "claim", buggy_claim)
    monkeypatch.setattr(inbox, "claim_many", buggy_claim_many)
    metrics = Metrics()
    batching = settings.model_copy(update={"worker_batch_size": batch_size})
    worker = Worker(batching, router, metrics=metrics)
    stop = asyncio.Event()

    def database_up() -> float | None:
        return metrics.registry.get_sample_value(
            "postroom_connection_up", {"component": "worker", "peer": "database"}
        )

    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(worker.run(stop))
        try:
            await eventually(lambda: worker.ready or task.done(), timeout=20)
            assert worker.ready
            await _put(settings, Ping(n=1))
            await eventually(lambda: injected >= 1, timeout=10)
            for n in range(5):  # the other consumer flows while the bug recurs
                await _put(settings, Pong(n=n))
            await eventually(lambda: len(pongs) == 5, timeout=20)
            assert database_up() == 1.0 and worker.ready
            await eventually(lambda: pings == [1], timeout=30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await _delete_queues(settings, router)

    assert injected == 3 and worker.stats.bugs == 3
    assert worker.stats.requeued == 3
    assert worker.stats.reconnects == 0
    bugs = [e for e in logs if e["event"] == "worker.bug"]
    assert len(bugs) == 3
    assert all(e["log_level"] == "error" for e in bugs)
    assert all(isinstance(e["exc_info"], OSError) for e in bugs)  # rendered with its traceback
    assert not [e for e in logs if e["event"].startswith("worker.waiting")]


def test_only_lost_connections_are_outages() -> None:
    assert not outage.is_outage(OSError("a file a bug failed to open"))
    assert not outage.is_outage(TimeoutError())
    assert not outage.is_outage(ConnectionResetError("a handler's HTTP call"))
    lost = outage.Unreachable("database", "postgresql://h/db", ConnectionRefusedError())
    assert outage.is_outage(lost)
    assert outage.peer_of(lost) == "database"
    try:
        try:
            raise ConnectionResetError("socket")
        except ConnectionResetError as exc:
            raise outage.Unreachable("broker", "amqp://h/", exc) from exc
    except outage.Unreachable as exc:
        assert outage.is_outage(RuntimeError("wrapped")) is False
        assert outage.peer_of(exc) == "broker"


async def test_relay_bug_is_logged_and_retried_without_reconnecting(
    settings, sessions, monkeypatch
):
    box = postroom.Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        await box.publish(session, Ping(n=1))
    relay = Relay(settings)
    real = relay._outgoing
    calls = 0

    def buggy(row: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError("injected: a TimeoutError raised by a programming error")
        return real(row)

    monkeypatch.setattr(relay, "_outgoing", buggy)
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(relay.run_until_idle(), 30)
    assert calls == 2 and relay.stats.reconnects == 0
    [bug] = [e for e in logs if e["event"] == "relay.bug"]
    assert bug["log_level"] == "error" and isinstance(bug["exc_info"], TimeoutError)
    async with sessions() as session:
        left = await session.scalar(text(f'SELECT count(*) FROM "{settings.schema_name}".outbox'))
    assert left == 1  # no queue bound: refused, rescheduled for later, not due


@pytest.mark.parametrize("dependency", ["database", "broker"])
async def test_each_wait_for_a_dependency_says_which_where_and_why(settings, names, dependency):
    from tests.helpers import free_port

    port = free_port()  # nothing listens there: connection refused
    if dependency == "database":
        url = settings.database_url.get_secret_value().replace(
            "postgres@127.0.0.1:5432", f"postgres:s3cret-pw@127.0.0.1:{port}", 1
        )
        away = settings.model_copy(update={"database_url": SecretStr(url)})
    else:
        url = f"amqp://guest:s3cret-pw@127.0.0.1:{port}/"
        away = settings.model_copy(update={"amqp_url": SecretStr(url)})
    router = Router()

    @router.consumer(f"kinds.{names}.wait", Ping)
    async def handle(event: Ping, ctx: Context) -> None:
        pass

    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(Worker(away, router).run(stop))
        waits = lambda: [e for e in logs if e["event"] == f"worker.waiting_for_{dependency}"]  # noqa: E731
        await eventually(lambda: len(waits()) >= 2, timeout=20)
        stop.set()
        await asyncio.wait_for(task, 20)
    first, second = waits()[:2]
    assert (first["attempt"], second["attempt"]) == (1, 2)
    for wait in (first, second):
        assert wait["dependency"] == dependency
        assert f"127.0.0.1:{port}" in wait["url"] and "s3cret-pw" not in wait["url"]
        assert "refused" in wait["error"].lower() or "connect" in wait["error"].lower()
    assert "s3cret-pw" not in repr(logs)
