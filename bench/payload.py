"""What every phase sends: one event shape, ~300-byte JSON bodies, realistic headers.

The relay's rows, the raw baselines' messages and the consumer's input all carry the
same body size, AMQP properties and header table, so a ratio compares code paths and
not message sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractConnection

from bench.env import EXCHANGE, QUEUE, TOPIC
from postroom import Event
from postroom.message import Message, uuid7
from postroom.tracing import new_traceparent

BODY_BYTES = 300
_TEMPLATE = '{"order_id":%d,"customer":"c-%05d","total_cents":%d,"note":"%s"}'
# Pad the note so a typical body (6-digit ids) is BODY_BYTES long.
NOTE = "x" * (BODY_BYTES - len(_TEMPLATE % (123456, 42, 12345, "")))


class BenchOrder(Event, topic=TOPIC):
    """The benchmark's event: a few fields and a note that pads the body to ~300 bytes."""

    order_id: int
    customer: str
    total_cents: int
    note: str


def order(i: int) -> BenchOrder:
    return BenchOrder(order_id=i, customer=f"c-{i % 1000:05d}", total_cents=i % 100_000, note=NOTE)


def body(i: int) -> bytes:
    return (_TEMPLATE % (i, i % 1000, i % 100_000, NOTE)).encode()


def message(i: int) -> Message:
    """A postroom envelope for event *i*, as the outbox would store it."""
    message_id = uuid7()
    return Message(
        message_id=message_id,
        topic=TOPIC,
        body=body(i),
        occurred_at=datetime.now(UTC),
        correlation_id=str(message_id),
        traceparent=new_traceparent(),
    )


def amqp_message(i: int) -> aio_pika.Message:
    """What a hand-written publisher would send for event *i*: same properties and headers."""
    m = message(i)
    return aio_pika.Message(
        m.body,
        headers=m.amqp_headers(),  # type: ignore[arg-type]
        content_type=m.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=m.correlation_id,
        message_id=str(m.message_id),
        timestamp=m.occurred_at,
        type=m.topic,
    )


# One statement fills the outbox: rows shaped like Outbox.publish() writes them.
FILL_SQL = """
INSERT INTO postroom.outbox (message_id, topic, ordering_key, routing_key, headers, body,
                             content_type, correlation_id, occurred_at)
SELECT s.mid, $2::text, CASE WHEN $4::int > 0 THEN 'k' || (s.g % $4::int) END, $2,
       jsonb_build_object(
           'cloudEvents_id', s.mid::text, 'cloudEvents_type', $2,
           'cloudEvents_source', 'postroom', 'cloudEvents_time', now()::text,
           'cloudEvents_specversion', '1.0', 'postroom-attempt', 1,
           'traceparent', '00-' || md5(s.mid::text) || '-' || left(md5(s.g::text), 16) || '-01'),
       convert_to(format('{"order_id":%s,"customer":"c-%s","total_cents":%s,"note":"%s"}',
                         s.g, lpad((s.g % 1000)::text, 5, '0'), s.g % 100000, $3::text), 'UTF8'),
       'application/json', s.mid::text, now()
FROM (SELECT g, gen_random_uuid() AS mid FROM generate_series(1, $1::int) AS g) AS s
"""


async def fill_outbox(dsn: str, rows: int, *, keys: int = 0, notify: bool = True) -> None:
    """Insert *rows* outbox rows in one transaction (and one NOTIFY), then ANALYZE."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(FILL_SQL, rows, TOPIC, NOTE, keys)
            if notify:
                await conn.execute("SELECT pg_notify('postroom.outbox', '')")
        await conn.execute("ANALYZE postroom.outbox")
    finally:
        await conn.close()


async def outbox_head(conn: asyncpg.Connection[Any]) -> int | None:
    """The lowest id still in the outbox (None when it is empty); uses the primary key."""
    value: int | None = await conn.fetchval("SELECT id FROM postroom.outbox ORDER BY id LIMIT 1")
    return value


async def declare_sink(connection: AbstractConnection) -> None:
    """The durable topic exchange and one quorum queue bound to the benchmark topic."""
    channel = await connection.channel()
    try:
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, routing_key=TOPIC)
        await queue.purge()
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def purging(connection: AbstractConnection, *, every: float = 0.5) -> AsyncIterator[Any]:
    """Purge the sink queue every *every* seconds while the block runs.

    The drain phases measure publishing, not the broker holding 100k messages: a
    purge costs the broker one Raft command per call instead of one delivery per
    message (a consumer would double the broker's work and compete for the two
    cores). The largest purge is reported, to show the queue stayed bounded.
    """
    channel = await connection.channel()
    queue = await channel.get_queue(QUEUE, ensure=False)
    stats = {"max_depth": 0, "purged": 0}

    async def loop() -> None:
        while True:
            await asyncio.sleep(every)
            result = await queue.purge()
            count = int(getattr(result, "message_count", 0) or 0)
            stats["purged"] += count
            stats["max_depth"] = max(stats["max_depth"], count)

    task = asyncio.create_task(loop())
    try:
        yield stats
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        result = await queue.purge()
        stats["purged"] += int(getattr(result, "message_count", 0) or 0)
        await channel.close()


def new_id() -> str:
    return str(uuid.uuid4())
