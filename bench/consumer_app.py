"""The benchmark's consumer: one-row domain write per message, stamped when handled.

Run by ``python -m postroom worker bench.consumer_app:router`` in the consumer and
end-to-end phases. ``handled_at`` (wall clock, seconds) gives both the rate (first to
last handled) and, joined with the load generator's commit times, the latency.
"""

from __future__ import annotations

import time

from sqlalchemy import BigInteger, Column, Double, MetaData, Table, insert

from bench.payload import BenchOrder
from postroom import BatchContext, Context, Router

CONSUMER = "bench.consumer"

domain = MetaData()
consumed = Table(
    "bench_consumed",
    domain,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("order_id", BigInteger, nullable=False),
    Column("handled_at", Double, nullable=False),
)
INSERT = insert(consumed)

router = Router()
"""The fast handle: the handler writes through ``ctx.connection`` (SQLAlchemy Core)."""


@router.consumer(CONSUMER, BenchOrder, max_attempts=3)
async def handle(event: BenchOrder, ctx: Context) -> None:
    await ctx.connection.execute(INSERT, {"order_id": event.order_id, "handled_at": time.time()})


session_router = Router()
"""The same write through ``ctx.session``: what an ORM session per message costs."""


@session_router.consumer(CONSUMER, BenchOrder, max_attempts=3)
async def handle_in_session(event: BenchOrder, ctx: Context) -> None:
    await ctx.session.execute(INSERT, {"order_id": event.order_id, "handled_at": time.time()})


batch_router = Router()
"""A batch handler (``batch=True``): one call per batch, all its rows in ONE statement.

SQLAlchemy Core's ``execute(INSERT, [rows...])`` (no RETURNING) goes to asyncpg's
``executemany``, the write the raw 200-per-transaction loop does."""


@batch_router.consumer(CONSUMER, BenchOrder, max_attempts=3, batch=True)
async def handle_batch(events: list[BenchOrder], ctx: BatchContext) -> None:
    now = time.time()
    await ctx.connection.execute(
        INSERT, [{"order_id": event.order_id, "handled_at": now} for event in events]
    )
