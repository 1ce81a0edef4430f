"""Pausing a consumer: every worker stops taking its messages, others flow, resume drains.

Real PostgreSQL, RabbitMQ, relay and worker; the pause is the row `postroom consumers
pause` writes. What is asserted is state: the paused consumer's effects stop and its
queue's ready count grows while the other consumer's effects keep growing; after resume
every message was applied exactly once by each consumer and nothing became a dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from sqlalchemy import text

import postroom
from postroom import Outbox, pauses
from postroom.metrics import Metrics
from postroom.router import Context, Router
from postroom.settings import Settings
from postroom.worker import Worker
from tests.helpers import eventually, logs_of, running_relay, spawn, wait_exit

BOUND = 4.0
"""Seconds after a pause within which no handler of that consumer may still run."""


class Tick(postroom.Event, topic="pauses.tick"):
    id: int


def tick_router(paused: str, flowing: str, *, ordered: bool) -> Router:
    router = Router()

    async def handle(event: Tick, ctx: Context) -> None:
        await asyncio.sleep(0.005)
        await ctx.session.execute(
            text(f'INSERT INTO "{ctx.outbox.schema}".ticks (consumer, id) VALUES (:c, :i)'),
            {"c": ctx.consumer, "i": event.id},
        )

    router.consumer(paused, Tick, ordered=ordered)(handle)
    router.consumer(flowing, Tick)(handle)
    return router


async def scalar(sessions, sql: str, **params: Any) -> Any:
    async with sessions() as session:
        return (await session.execute(text(sql), params)).scalar_one()


async def ready_count(amqp, queue: str) -> int:
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


@pytest.mark.parametrize("mode", ["plain", "batched", "ordered"])
async def test_pause_stops_one_consumer_resume_drains_it(
    settings: Settings, sessions, engine, amqp, names: str, mode: str
) -> None:
    schema = settings.schema_name
    async with sessions() as session, session.begin():
        await session.execute(
            text(
                f'CREATE TABLE "{schema}".ticks (consumer text, id int, '
                "at timestamptz DEFAULT clock_timestamp())"
            )
        )
    paused, flowing = f"paused-{names}", f"flowing-{names}"
    router = tick_router(paused, flowing, ordered=mode == "ordered")
    tuned = settings.model_copy(
        update={
            "pause_poll_interval": 0.2,
            "worker_batch_size": 8 if mode == "batched" else 1,
            "shutdown_timeout": 5.0,
        }
    )
    box = Outbox.from_settings(tuned)
    published = 0
    publishing = asyncio.Event()
    publishing.set()

    async def publish_steadily() -> None:
        nonlocal published
        while publishing.is_set():
            async with sessions() as session, session.begin():
                for _ in range(2):
                    await box.publish(session, Tick(id=published), key=str(published % 4))
                    published += 1
            await asyncio.sleep(0.04)  # about 50 messages a second

    def effects(consumer: str) -> Any:
        return scalar(
            sessions, f'SELECT count(*) FROM "{schema}".ticks WHERE consumer = :c', c=consumer
        )

    # Two workers, as two replicas: each one must stop taking the paused consumer's messages.
    meters = [Metrics(), Metrics()]
    workers = [Worker(tuned, router, metrics=m) for m in meters]
    stop = asyncio.Event()
    async with running_relay(tuned):
        running = [asyncio.create_task(worker.run(stop)) for worker in workers]
        publisher: asyncio.Task[None] | None = None
        try:
            # Publish once both queues are declared: a message relayed before would reach
            # only the queues bound by then.
            await eventually(lambda: all(worker.ready for worker in workers), timeout=20)
            publisher = asyncio.create_task(publish_steadily())
            await eventually(lambda: _at_least(effects(paused), 20), timeout=30)

            # Pause. Within BOUND its handlers stop; the other consumer flows on.
            _, changed = await pauses.pause(engine, schema, paused, actor="test", reason="drill")
            assert changed
            paused_at = asyncio.get_running_loop().time()
            for meter in meters:
                await eventually(lambda m=meter: _gauge(m, paused) == 1.0, timeout=BOUND)
            await asyncio.sleep(0.5)  # the last handlers that were running commit
            frozen = await effects(paused)
            assert asyncio.get_running_loop().time() - paused_at < BOUND
            flowing_then = await effects(flowing)
            ready_then = await ready_count(amqp, paused)
            await eventually(lambda: _at_least(effects(flowing), flowing_then + 60), timeout=30)
            assert await effects(paused) == frozen, "a handler of the paused consumer ran"
            assert await ready_count(amqp, paused) >= ready_then + 40, "its queue did not grow"
            assert _gauge(meters[0], flowing) == 0.0

            # Resume: the queue drains, both consumers end with every message once.
            assert await pauses.resume(engine, schema, paused, actor="test") is not None
            for meter in meters:
                await eventually(lambda m=meter: _gauge(m, paused) == 0.0, timeout=BOUND)
            publishing.clear()
            await publisher
            for consumer in (paused, flowing):
                try:
                    await eventually(lambda c=consumer: _exactly(effects(c), published), timeout=60)
                except AssertionError:
                    outbox = await scalar(sessions, f'SELECT count(*) FROM "{schema}".outbox')
                    raise AssertionError(
                        f"{consumer}: {await effects(consumer)} of {published} applied; "
                        f"outbox {outbox}, ready {await ready_count(amqp, consumer)}"
                    ) from None
            await asyncio.sleep(0.5)  # anything doubled would show now
            for consumer in (paused, flowing):
                doubled = await scalar(
                    sessions,
                    f'SELECT count(*) - count(DISTINCT id) FROM "{schema}".ticks '
                    "WHERE consumer = :c",
                    c=consumer,
                )
                assert doubled == 0 and await effects(consumer) == published
            dead = await scalar(sessions, f'SELECT count(*) FROM "{schema}".dead_letters')
            assert dead == 0
            assert await ready_count(amqp, paused) == 0
            assert [w.stats.reconnects for w in workers] == [0, 0], "a pause is no outage"
        finally:
            publishing.clear()
            if publisher is not None:
                with contextlib.suppress(Exception):
                    await publisher
            stop.set()
            await asyncio.wait_for(asyncio.gather(*running), timeout=30)
            channel = await amqp.channel()
            for consumer in router:
                for name in (consumer.name, f"{consumer.name}.dead"):
                    await channel.queue_delete(name)
            await channel.close()


async def _at_least(value: Any, floor: int) -> bool:
    return int(await value) >= floor


async def _exactly(value: Any, expected: int) -> bool:
    return int(await value) == expected


def _gauge(metrics: Metrics, consumer: str) -> float | None:
    return metrics.registry.get_sample_value("postroom_consumer_paused", {"consumer": consumer})


async def test_consumers_cli_pause_list_resume_and_audit(settings: Settings, engine) -> None:
    from tests.test_ops import cli

    unknown = await cli(settings, "consumers", "pause", "billing.issue-invoce")
    assert unknown.exit_code == 2
    assert "no consumer 'billing.issue-invoce' has handled or failed a message" in unknown.output
    checked = await cli(
        settings, "consumers", "pause", "nope", "--router", "tests.apps.repairable:router"
    )
    assert checked.exit_code == 2 and "known: books.apply, books.notify" in checked.output

    paused = await cli(
        settings,
        "consumers",
        "pause",
        "books.apply",
        "--router",
        "tests.apps.repairable:router",
        "--reason",
        "invoicing is down",
        "--actor",
        "ana",
    )
    assert paused.exit_code == 0, paused.output
    again = await cli(settings, "consumers", "pause", "books.apply", "--force", "--actor", "bo")
    assert again.exit_code == 0 and "already paused" in again.output and "by ana" in again.output
    listed = await cli(
        settings, "consumers", "list", "--router", "tests.apps.repairable:router", "--json"
    )
    rows = {row["consumer"]: row for row in json.loads(listed.output)["consumers"]}
    assert rows["books.apply"]["paused"] and rows["books.apply"]["pause"]["reason"] == (
        "invoicing is down"
    )
    assert rows["books.notify"]["paused"] is False

    resumed = await cli(settings, "consumers", "resume", "books.apply", "--actor", "bo")
    assert resumed.exit_code == 0, resumed.output
    twice = await cli(settings, "consumers", "resume", "books.apply")
    assert twice.exit_code == 1 and "is not paused" in twice.output
    trail = await cli(settings, "audit", "--json")
    actions = [
        (e["actor"], e["action"], e["details"]["consumer"])
        for e in json.loads(trail.output)["audit"]
    ]
    assert actions == [
        ("bo", "consumers.resume", "books.apply"),
        ("ana", "consumers.pause", "books.apply"),
    ]


async def test_worker_on_a_schema_without_pauses_says_migrate(
    settings: Settings, sessions, amqp
) -> None:
    async with sessions() as session, session.begin():
        await session.execute(text(f'DROP TABLE "{settings.schema_name}".pauses'))
    worker = spawn(settings, "worker", "tests.apps.repairable:router")
    code = await wait_exit(worker, timeout=60)
    log = logs_of(worker)
    assert code == 2, log
    assert f"schema '{settings.schema_name}' has no table pauses" in log
    assert "run `postroom migrate`" in log and "Traceback" not in log
    channel = await amqp.channel()
    for name in ("books.apply", "books.apply.dead", "books.notify", "books.notify.dead"):
        await channel.queue_delete(name)
    await channel.close()
