"""Burst mode: run until there is nothing left to do, so tests wait for a state, not a time."""

from __future__ import annotations

import asyncio

import aio_pika
from sqlalchemy import text

import postroom
from postroom import Router
from postroom.relay import Relay
from postroom.router import Context
from postroom.worker import Worker


class Tick(postroom.Event, topic="burst.tick"):
    n: int


async def test_relay_until_idle_then_worker_in_burst_mode(settings, sessions, names):
    router = Router()
    seen: list[int] = []

    @router.consumer(f"burst.{names}", Tick)
    async def handle(event: Tick, ctx: Context) -> None:
        await asyncio.sleep(0.01)
        seen.append(event.n)

    # Queues first (a burst run declares them, then finds them empty and returns).
    await asyncio.wait_for(Worker(settings, router).run(asyncio.Event(), burst=True), 30)
    box = postroom.Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        for n in range(50):
            await box.publish(session, Tick(n=n))
    await asyncio.wait_for(Relay(settings).run_until_idle(), 30)
    async with sessions() as session:
        left = await session.scalar(text(f'SELECT count(*) FROM "{settings.schema_name}".outbox'))
    assert left == 0
    worker = Worker(settings, router)
    try:
        await asyncio.wait_for(worker.run(asyncio.Event(), burst=True), 60)
        assert sorted(seen) == list(range(50))
        assert worker.stats.outcomes == {"acked": 50}
    finally:
        connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
        channel = await connection.channel()
        for name in (f"burst.{names}", f"burst.{names}.dead"):
            await channel.queue_delete(name)
        await connection.close()
