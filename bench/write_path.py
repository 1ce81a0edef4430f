"""Phase 2, write path: a one-row domain transaction with and without ``publish()``.

``connections`` tasks each run transactions back to back on their own pooled
connection for a fixed time. Variants, interleaved over rounds so drift hits all:
* ``raw asyncpg: insert``: the database's own ceiling for this transaction (context);
* ``raw asyncpg: insert + outbox insert``: the same plus the very statement
  ``publish()`` sends (outbox INSERT + NOTIFY in one CTE), prebuilt values: the
  physical cost of one more statement, the floor under ``publish()``'s cost;
* ``session: insert``: the baseline, an ``AsyncSession`` transaction inserting one
  domain row with a Core insert (the leanest thing a SQLAlchemy service does);
* ``session: insert + publish``: the same plus ``Outbox.publish()`` with NOTIFY
  (the default), and with ``Outbox(notify=False)``.
No relay listens meanwhile: this is the writer's own cost.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from sqlalchemy import BigInteger, Column, Integer, MetaData, Table, Text, insert
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bench import payload
from bench.env import BenchEnv, CpuMeter, cpu_delta
from bench.report import Figure, Results
from postroom import Outbox

BASE = "session: insert"
domain = MetaData()
orders = Table(
    "bench_orders",
    domain,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("customer", Text, nullable=False),
    Column("total_cents", Integer, nullable=False),
    Column("note", Text, nullable=False),
)
RAW_INSERT = "INSERT INTO bench_orders (customer, total_cents, note) VALUES ($1, $2, $3)"
RAW_OUTBOX = (
    "WITH written AS (INSERT INTO postroom.outbox (message_id, topic, routing_key, headers,"
    " body, content_type, correlation_id, occurred_at) VALUES ($1, $2, $2, $3, $4, $5, $6, $7))"
    " SELECT pg_notify('postroom.outbox', '')"
)


async def _timed(
    env: BenchEnv,
    name: str,
    connections: int,
    seconds: float,
    one: Callable[[int, int], Awaitable[None]],
) -> Figure:
    meter = CpuMeter(env.database)
    count = [0] * connections

    async def worker(w: int) -> None:
        i = w * 10_000_000
        while time.perf_counter() < deadline:
            await one(w, i)
            i += 1
            count[w] += 1

    before = meter.snapshot()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(worker(w) for w in range(connections)))
    elapsed = time.perf_counter() - started
    after = meter.snapshot()
    done = sum(count)
    return Figure(
        "write",
        name,
        done / elapsed,
        "tx/s",
        messages=done,
        seconds=round(elapsed, 3),
        baseline=None if name == BASE else BASE,
        extra={"connections": connections},
    ).with_cpu(cpu_delta(before, after))


async def run(env: BenchEnv, results: Results, *, quick: bool) -> None:
    connections = 8
    # Short slices, variants interleaved: the load other users put on the two cores
    # drifts over seconds, and fine interleaving spreads it evenly over the variants.
    seconds = 0.5
    rounds = 8 if quick else 24
    print(
        f"write path: {connections} connections, {rounds} rounds of {seconds} s per variant",
        flush=True,
    )
    results.notes["write"] = {
        "connections": connections,
        "seconds_per_slice": seconds,
        "rounds": rounds,
        "transaction": "one Core INSERT of a 4-column domain row (+ one publish())",
    }
    engine = create_async_engine(env.database_url, pool_size=connections, max_overflow=0)
    pool = await asyncpg.create_pool(env.dsn, min_size=connections, max_size=connections)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(domain.create_all)
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        notify, quiet = Outbox(), Outbox(notify=False)

        def row(i: int) -> dict[str, Any]:
            return {"customer": f"c-{i % 1000:05d}", "total_cents": i % 100_000, "note": "n"}

        async def raw_tx(_: int, i: int) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(RAW_INSERT, f"c-{i % 1000:05d}", i % 100_000, "n")

        sample = payload.message(0)
        headers = json.dumps(sample.amqp_headers(), default=str)

        async def raw_outbox_tx(_: int, i: int) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(RAW_INSERT, f"c-{i % 1000:05d}", i % 100_000, "n")
                await conn.execute(
                    RAW_OUTBOX,
                    uuid.uuid4(),
                    sample.topic,
                    headers,
                    sample.body,
                    sample.content_type,
                    sample.correlation_id,
                    sample.occurred_at,
                )

        def session_tx(box: Outbox | None) -> Callable[[int, int], Awaitable[None]]:
            async def tx(_: int, i: int) -> None:
                async with sessions() as session, session.begin():
                    await session.execute(insert(orders).values(row(i)))
                    if box is not None:
                        await box.publish(session, payload.order(i))

            return tx

        variants = [
            ("raw asyncpg: insert", raw_tx),
            ("raw asyncpg: insert + outbox insert", raw_outbox_tx),
            (BASE, session_tx(None)),
            ("session: insert + publish", session_tx(notify)),
            ("session: insert + publish, no NOTIFY", session_tx(quiet)),
        ]
        # Warm both pools and SQLAlchemy's statement caches before the clock runs.
        for _, tx in variants:
            await asyncio.gather(*(tx(w, w) for w in range(connections)))
        runs: dict[str, list[Figure]] = {}
        for round_ in range(rounds):
            for name, tx in variants if round_ % 2 == 0 else variants[::-1]:
                figure = await _timed(env, name, connections, seconds, tx)
                runs.setdefault(name, []).append(figure)
        from bench.relay_drain import merge

        for name, _ in variants:
            merged = merge(runs[name])
            merged.extra["runs"] = sorted(merged.extra["runs"])
            results.add(merged)
        notes = results.notes["write"]
        base = results.find("write", BASE)
        with_notify = results.find("write", "session: insert + publish")
        without = results.find("write", "session: insert + publish, no NOTIFY")
        if base and with_notify and without and without.value:
            notes["notify_cost"] = round(1 - with_notify.value / without.value, 3)
            # Client CPU per transaction: steadier than throughput on shared cores.
            per_tx = {f.name: f.cpu_per_1k.get("client", 0.0) for f in (base, with_notify, without)}
            notes["client_cpu_ms_per_tx"] = per_tx
            notes["publish_client_cpu_ratio"] = round(per_tx[with_notify.name] / per_tx[BASE], 3)
        raw = results.find("write", "raw asyncpg: insert")
        raw_outbox = results.find("write", "raw asyncpg: insert + outbox insert")
        if base and with_notify and raw and raw_outbox and raw.value and base.value:
            # What one more statement costs with no library at all, beside what publish() costs.
            notes["raw_extra_statement_cost"] = round(1 - raw_outbox.value / raw.value, 3)
            notes["publish_cost"] = round(1 - with_notify.value / base.value, 3)
        async with engine.begin() as conn:
            await conn.run_sync(domain.drop_all)
        await _clear_outbox(env)
    finally:
        await pool.close()
        await engine.dispose()


async def _clear_outbox(env: BenchEnv) -> None:
    conn = await asyncpg.connect(env.dsn)
    try:
        await conn.execute("TRUNCATE postroom.outbox")
    finally:
        await conn.close()
