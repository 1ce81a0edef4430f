"""Faults that come from the service around postroom rather than from the machines.

A long transaction holding outbox rows, a writer transaction left open while relays
claim, writers whose clock is off, handlers slower than the prefetch window, malformed
and oversized messages on the broker, a whole fleet killed at once. Each is an
``async def fault(chaos)`` like those in :mod:`tests.faults.chaos`; the ones that commit
messages do it through the scenario's :class:`~tests.faults.workload.Writers` (in
``chaos.extra["writers"]``, writing to ``chaos.extra["writer_url"]``), so the ledger
knows them and the checker holds them to the same invariants as the steady workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import aio_pika
import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from postroom import rabbit
from postroom.broker import Broker
from postroom.tables import qualified
from tests.apps.faultapp import Entry
from tests.faults.workload import Chaos, Writers


def _writers(chaos: Chaos) -> Writers:
    writers: Writers = chaos.extra["writers"]
    return writers


@contextlib.asynccontextmanager
async def _sessions(chaos: Chaos) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(
        chaos.extra["writer_url"],
        pool_size=2,
        pool_pre_ping=True,
        connect_args={"timeout": 5, "command_timeout": 30},
    )
    try:
        yield async_sessionmaker(engine, expire_on_commit=False)
    finally:
        await engine.dispose()


async def commit(chaos: Chaos, **kwargs: object) -> list[str]:
    """Commit one transaction through the writers; a failure is a writer error, noted."""
    writers = _writers(chaos)
    async with _sessions(chaos) as sessions:
        try:
            return await writers.commit(sessions, **kwargs)  # type: ignore[arg-type]
        except Exception as exc:
            writers.ledger.errors[type(exc).__name__] += 1
            return []


async def outbox_lock(chaos: Chaos) -> None:
    """Another transaction holds keyed outbox rows (``FOR UPDATE``) for a few seconds.

    Rows of a few keys are committed due a moment later, then locked before the relay
    can claim them; meanwhile the steady writers commit more rows of the same keys. The
    relay must neither wait for nor skip past the locked heads of their keys.
    """
    writers = _writers(chaos)
    keys = chaos.rng.sample(writers.keys, 2)
    ids: list[str] = []
    for key in keys:
        ids += await commit(chaos, key=key, count=2, delay=timedelta(seconds=1.5))
    committed = [m for m in ids if m in writers.ledger.committed]
    if not committed:
        return
    hold = chaos.rng.uniform(2.0, 5.0)
    conn = await asyncpg.connect(chaos.admin_dsn, timeout=10)
    try:
        async with conn.transaction():
            locked = await conn.fetch(
                f"SELECT id FROM {qualified(writers.schema, 'outbox')} "
                "WHERE message_id = ANY($1::uuid[]) FOR UPDATE",
                committed,
            )
            if locked:
                chaos.note("outbox_lock", f"{len(locked)} rows of {keys} for {hold:.1f}s")
                await asyncio.sleep(hold)
    finally:
        await conn.close()


async def long_transaction(chaos: Chaos) -> None:
    """A writer transaction stays open for seconds while relays claim newer rows.

    Its rows get their ids when inserted and commit long after rows with higher ids: a
    relay that kept an "id > last seen" cursor would skip them for good.
    """
    writers = _writers(chaos)
    hold = chaos.rng.uniform(2.0, 6.0)
    key = chaos.rng.choice([None, *writers.keys])
    chaos.note("long_transaction", f"key {key} open {hold:.1f}s")
    await commit(chaos, key=key, count=3, hold=hold)


async def clock_skew(chaos: Chaos) -> None:
    """Writers whose clock is off: ``occurred_at`` hours away, ``available_at`` skewed.

    One transaction's rows are due an hour in the past (a writer behind), another's a
    few seconds in the future (a writer ahead: they wait, and so do later rows of their
    key); ``occurred_at`` is shifted by up to two hours either way.
    """
    writers = _writers(chaos)
    key = chaos.rng.choice(writers.keys)
    behind = timedelta(hours=-1)
    ahead = timedelta(seconds=chaos.rng.uniform(1.0, 4.0))
    occurred = timedelta(minutes=chaos.rng.uniform(-120, 120))
    await commit(chaos, key=key, count=2, skew=(occurred, behind))
    await commit(chaos, key=key, count=2, skew=(-occurred, ahead))
    chaos.note("clock_skew", f"key {key}: due -1h and +{ahead.total_seconds():.1f}s")


async def slow_consumer(chaos: Chaos) -> None:
    """More slow messages than a consumer's prefetch at once: the broker holds the rest."""
    prefetch = int(chaos.extra.get("prefetch", 64))
    count = prefetch + 40
    sleep = chaos.rng.uniform(0.01, 0.04)
    for _ in range(count // 20):
        await commit(chaos, key=None, count=20, sleep=sleep)
    chaos.note("slow_consumer", f"{count} messages of {sleep * 1000:.0f}ms, prefetch {prefetch}")


async def bad_input(chaos: Chaos) -> None:
    """Malformed and oversized messages published raw on the topic, past the outbox.

    Not JSON, JSON of the wrong shape, a body over ``max_body_bytes``: each must become
    one dead letter per consumer (undecodable, too large) and never an effect.
    """
    limit = int(chaos.extra.get("max_body_bytes", 1_048_576))
    bodies = {
        "not_json": b"\xff\xfe{not json",
        "wrong_shape": json.dumps({"key": 7, "seq": "x"}).encode(),
        "oversized": json.dumps(
            Entry(key=None, seq=0).model_dump() | {"pad": "x" * limit}
        ).encode(),
    }
    broker = Broker.parse(chaos.amqp_url, ca=chaos.extra.get("amqp_tls_ca"))
    connection = await rabbit.connect(broker, name="postroom-test", timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(chaos.extra.get("exchange", "postroom.events"))
        ledger = _writers(chaos).ledger
        for what, body in bodies.items():
            message_id = str(uuid.uuid4())
            ledger.foreign[message_id] = what
            try:
                await exchange.publish(
                    aio_pika.Message(
                        body,
                        message_id=message_id,
                        type=Entry.topic,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=Entry.topic,
                    mandatory=True,
                )
            except BaseException:
                # Unknown whether the broker took it: the checker ignores it either way.
                del ledger.foreign[message_id]
                ledger.foreign_unsure.add(message_id)
                raise
    finally:
        await connection.close()
    chaos.note("bad_input", ", ".join(bodies))


async def restart_fleet(chaos: Chaos) -> None:
    """SIGKILL every supervised relay and worker at once (a node lost, a bad rollout)."""
    live = chaos.fleet.live("relay") + chaos.fleet.live("worker")
    for proc in live:
        chaos.fleet.kill(proc)
    if live:
        chaos.note("sigkill_fleet", f"{len(live)} processes")
