"""The end-to-end load generator, run in its own process so it is never the bottleneck
unnoticed: ``python -m bench.loadgen DSN RATE SECONDS FIRST_ID NOTIFY OUT LOOP``.

Commits one-row transactions, each with one ``publish()``, on a fixed schedule (i / RATE
seconds after the start) over 32 connections, and writes each order id's commit time
(wall clock, after COMMIT returned), the achieved rate and its own CPU seconds to OUT
as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bench import payload
from bench.write_path import orders
from postroom import Outbox
from postroom.process import loop_factory

INSERT_ORDER = insert(orders)
CONNECTIONS = 32  # enough that commit latency never caps the offered rate


async def main(dsn: str, rate: float, seconds: float, first: int, notify: bool) -> str:
    engine = create_async_engine(dsn, pool_size=CONNECTIONS, max_overflow=0)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    box = Outbox(notify=notify)
    total = int(rate * seconds)
    commits: list[tuple[int, float]] = []
    next_slot = 0

    async def one(order_id: int) -> None:
        async with sessions() as session, session.begin():
            await session.execute(INSERT_ORDER, {"customer": "c", "total_cents": 1, "note": "n"})
            await box.publish(session, payload.order(order_id))
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
    await engine.dispose()
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
