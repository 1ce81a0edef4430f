"""The end-to-end load generator, run in its own process so it is never the bottleneck
unnoticed: ``python -m bench.loadgen DSN RATE SECONDS FIRST_ID NOTIFY OUT``.

Commits one-row transactions, each with one ``publish()``, on a fixed schedule (i / RATE
seconds after the start) over 8 connections, and writes each order id's commit time
(wall clock, after COMMIT returned) and the achieved rate to OUT as JSON.
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

CONNECTIONS = 8


async def main(dsn: str, rate: float, seconds: float, first: int, notify: bool) -> str:
    engine = create_async_engine(dsn, pool_size=CONNECTIONS, max_overflow=0)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    box = Outbox(notify=notify)
    total = int(rate * seconds)
    commits: list[tuple[int, float]] = []
    next_slot = 0

    async def one(order_id: int) -> None:
        async with sessions() as session, session.begin():
            await session.execute(insert(orders).values(customer="c", total_cents=1, note="n"))
            await box.publish(session, payload.order(order_id))
        commits.append((order_id, time.time()))

    for i in range(CONNECTIONS):  # warm the pool and the statement caches
        await one(first - 1 - i)
    commits.clear()
    started = time.perf_counter()

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
    return json.dumps({"achieved": len(commits) / elapsed, "commits": commits})


if __name__ == "__main__":
    dsn, rate, seconds, first, notify, out = sys.argv[1:7]
    report = asyncio.run(main(dsn, float(rate), float(seconds), int(first), notify == "1"))
    Path(out).write_text(report)
