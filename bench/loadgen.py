"""The end-to-end load generator, run in its own process so it is never the bottleneck
unnoticed: ``python -m bench.loadgen DSN RATE SECONDS FIRST_ID NOTIFY OUT LOOP``.

Commits one-row transactions, each with the very outbox row ``publish()`` writes, on a
fixed schedule (i / RATE seconds after the start) over 32 connections, and writes each
order id's commit time (wall clock, after COMMIT returned), the achieved rate and its own
CPU seconds to OUT as JSON. The write path is lean on purpose (raw asyncpg, prepared
statements; the message built as ``publish()`` builds it): at 1000 msg/s a SQLAlchemy
session per transaction cost the load generator more CPU than the worker, and the
machine saturated on the generator instead of the pipeline under test.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import asyncpg

from bench import payload
from bench.write_path import RAW_INSERT, RAW_OUTBOX
from postroom.process import loop_factory

CONNECTIONS = 32  # enough that commit latency never caps the offered rate
RAW_OUTBOX_QUIET = RAW_OUTBOX.split(")) SELECT", 1)[0].replace("WITH written AS (", "", 1) + ")"
"""The same outbox row without the NOTIFY (the relay polls)."""


async def main(dsn: str, rate: float, seconds: float, first: int, notify: bool) -> str:
    dsn = dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
    pool = await asyncpg.create_pool(dsn, min_size=CONNECTIONS, max_size=CONNECTIONS)
    outbox_sql = RAW_OUTBOX if notify else RAW_OUTBOX_QUIET
    total = int(rate * seconds)
    commits: list[tuple[int, float]] = []
    next_slot = 0

    async def one(order_id: int) -> None:
        message = payload.message(order_id)
        headers = json.dumps(message.amqp_headers(), default=str)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(RAW_INSERT, "c", 1, "n")
            await conn.execute(
                outbox_sql,
                message.message_id,
                message.topic,
                headers,
                message.body,
                message.content_type,
                message.correlation_id,
                message.occurred_at,
            )
        commits.append((order_id, time.time()))

    for i in range(CONNECTIONS):  # warm the pool and the statement caches
        await one(first - 1 - i)
    commits.clear()
    started = time.perf_counter()
    cpu_started = time.process_time()

    async def worker() -> None:
        nonlocal next_slot
        while next_slot < total:
            slot, next_slot = next_slot, next_slot + 1
            delay = started + slot / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await one(first + slot)

    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return json.dumps(
        {
            "achieved": len(commits) / elapsed,
            "cpu_seconds": time.process_time() - cpu_started,
            "commits": commits,
        }
    )


if __name__ == "__main__":
    dsn, rate, seconds, first, notify, out, event_loop = sys.argv[1:8]
    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        report = runner.run(main(dsn, float(rate), float(seconds), int(first), notify == "1"))
    Path(out).write_text(report)
