"""Phase 3, consumer: messages/s with the inbox and a one-row domain write.

Every variant drains a quorum queue pre-filled with ``n`` postroom messages (same
body, properties and headers as the relay sends), with the same prefetch and
concurrency as the worker's defaults (64 and 16):
* ``raw consume + ack``: aio-pika, no database: the broker side's ceiling;
* ``raw tx per message + ack``: asyncpg, one transaction inserting one row per
  message, ack after commit: the baseline (target: postroom >= 0.8x);
* ``raw 200 per tx + ack``: the same rows, 200 messages per transaction;
* ``postroom worker``: ``python -m postroom worker bench.consumer_app:router``
  (inbox + handler's one-row insert through ``ctx.connection`` + commit + ack, per
  message); ``, ctx.session``: the same insert through an ORM session;
* ``postroom worker, batch 200``: ``POSTROOM_WORKER_BATCH_SIZE=200`` (one inbox
  statement and one commit per batch, acks after it, a per-event handler call per
  message); ``, batch handler``: the same with a ``batch=True`` consumer writing the
  batch's rows with one ``executemany`` (target >= 0.6x the raw 200 per tx; both batch
  variants are held to that baseline); ``, concurrency 2``: the same with two handler
  slots instead of 16, so natural batches fill up (the raw loop runs one batch at a time).
The rate is (messages - 1) / (last handled - first handled), so process start-up and
the fill are not counted.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

from bench import payload
from bench.consumer_app import CONSUMER, consumed, domain
from bench.env import EXCHANGE, BenchEnv, CpuMeter, cpu_delta
from bench.procs import services, start_py_spy, stop_py_spy
from bench.report import Figure, Results
from postroom import rabbit

PREFETCH = 64
CONCURRENCY = 16
BATCH = 200
BASE = "raw tx per message + ack"
BATCH_BASE = f"raw {BATCH} per tx + ack"
RAW_QUEUE = "bench.raw-consumer"
INSERT = "INSERT INTO bench_consumed (order_id, handled_at) VALUES ($1, $2)"


def _spec(name: str) -> rabbit.QueueSpec:
    return rabbit.QueueSpec(name=name, topics=(payload.TOPIC,), delivery_limit=20)


async def fill(env: BenchEnv, queue: str, n: int) -> None:
    """Put *n* postroom-shaped messages straight into *queue* (default exchange)."""
    connection = await rabbit.connect(env.amqp_url, name="bench-fill")
    try:
        await rabbit.declare_queues(
            connection,
            exchange=EXCHANGE,
            dead_letter_exchange="postroom.dead",
            queues=[_spec(queue)],
        )
        channel = await connection.channel()
        await (await channel.get_queue(queue, ensure=False)).purge()
        await channel.close()
        publisher = await rabbit.ConfirmingPublisher.open(connection)
        for start in range(0, n, 1000):
            batch = []
            for i in range(start, min(start + 1000, n)):
                m = payload.message(i)
                batch.append(
                    rabbit.Outgoing(
                        exchange="",
                        routing_key=queue,
                        body=m.body,
                        message_id=str(m.message_id),
                        topic=m.topic,
                        timestamp=m.occurred_at,
                        content_type=m.content_type,
                        correlation_id=m.correlation_id,
                        headers=m.amqp_headers(),
                    )
                )
            if any(await publisher.publish_many(batch)):
                raise RuntimeError("filling the consumer queue failed")
        await publisher.close()
    finally:
        await connection.close()


async def _reset(env: BenchEnv) -> None:
    conn = await asyncpg.connect(env.dsn)
    try:
        await conn.execute("TRUNCATE bench_consumed, postroom.inbox")
    finally:
        await conn.close()


async def _handled_span(env: BenchEnv) -> tuple[int, float]:
    conn = await asyncpg.connect(env.dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, max(handled_at) - min(handled_at) AS span FROM bench_consumed"
        )
    finally:
        await conn.close()
    return int(row["n"]), float(row["span"] or 0.0)


async def raw_consume(env: BenchEnv, n: int, *, mode: str) -> Figure:
    """mode: "ack" (no database), "tx" (one transaction per message), "batch"."""
    await _reset(env)
    await fill(env, RAW_QUEUE, n)
    meter = CpuMeter(env.database)
    pool = await asyncpg.create_pool(env.dsn, min_size=CONCURRENCY, max_size=CONCURRENCY)
    connection = await aio_pika.connect(env.amqp_url)
    done = asyncio.Event()
    handled = 0
    stamps: list[float] = []
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=BATCH * 2 if mode == "batch" else PREFETCH)
        queue = await channel.get_queue(RAW_QUEUE, ensure=False)
        slots = asyncio.Semaphore(CONCURRENCY)
        ordered = asyncio.Lock()
        pending: list[aio_pika.abc.AbstractIncomingMessage] = []
        tasks: set[asyncio.Task[None]] = set()

        def count(k: int) -> None:
            nonlocal handled
            handled += k
            stamps.append(time.time())
            if handled >= n:
                done.set()

        async def one(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with slots:
                order_id = int(message.body[12 : message.body.index(b",")])
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(INSERT, order_id, time.time())
                await message.ack()
                count(1)

        async def flush() -> None:
            batch, pending[:] = list(pending), []
            if not batch:
                return
            # One batch at a time (the lock is FIFO): an ack with multiple=True must
            # never cover an earlier batch that has not committed yet.
            async with ordered:
                rows = [(int(m.body[12 : m.body.index(b",")]), time.time()) for m in batch]
                async with pool.acquire() as conn, conn.transaction():
                    await conn.executemany(INSERT, rows)
                await batch[-1].ack(multiple=True)
                count(len(batch))

        flusher: asyncio.TimerHandle | None = None

        def spawn(coro: object) -> None:
            task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal flusher
            if mode == "ack":
                await message.ack()
                count(1)
            elif mode == "tx":
                spawn(one(message))
            else:
                pending.append(message)
                if len(pending) >= BATCH:
                    if flusher is not None:
                        flusher.cancel()
                        flusher = None
                    spawn(flush())
                elif flusher is None:
                    flusher = asyncio.get_running_loop().call_later(0.005, timed_flush)

        def timed_flush() -> None:
            nonlocal flusher
            flusher = None
            spawn(flush())

        before = meter.snapshot()
        started = time.time()
        tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout=max(120.0, n / 50))
        seconds = time.time() - started
        after = meter.snapshot()
        await queue.cancel(tag)
        await channel.close()
    finally:
        await connection.close()
        await pool.close()
    name = {"ack": "raw consume + ack", "tx": BASE, "batch": BATCH_BASE}[mode]
    return Figure(
        "consumer",
        name,
        n / seconds,
        "msg/s",
        messages=n,
        seconds=round(seconds, 3),
        baseline=None if name == BASE else BASE,
        extra={"prefetch": BATCH * 2 if mode == "batch" else PREFETCH},
    ).with_cpu(cpu_delta(before, after))


async def worker_consume(
    env: BenchEnv,
    n: int,
    *,
    batch: int = 1,
    profile_to: Path | None = None,
    app: str = "bench.consumer_app:router",
    concurrency: int = CONCURRENCY,
) -> Figure:
    await _reset(env)
    await fill(env, CONSUMER, n)
    meter = CpuMeter(env.database)
    extra_env = {
        "POSTROOM_WORKER_PREFETCH": str(max(PREFETCH, batch * 2)),
        "POSTROOM_WORKER_CONCURRENCY": str(concurrency),
        "POSTROOM_WORKER_BATCH_SIZE": str(batch),
    }
    async with services(
        env,
        ["worker", app],
        ready_marker="worker.consuming",
        extra_env=extra_env,
    ) as procs:
        pids = [p.pid for p in procs]
        spy = await start_py_spy(pids[0], profile_to) if profile_to else None
        before = meter.snapshot(pids)
        deadline = time.time() + max(180.0, n / 30)
        while True:
            count, span = await _handled_span(env)
            if count >= n:
                break
            if time.time() > deadline:
                raise RuntimeError(f"worker handled {count} of {n} in time")
            if procs[0].proc.returncode is not None:
                raise RuntimeError("worker died:\n" + "\n".join(procs[0].lines[-15:]))
            await asyncio.sleep(0.1)
        after = meter.snapshot(pids)
        if spy is not None:
            await stop_py_spy(spy)
    name = "postroom worker" + (f", batch {batch}" if batch > 1 else "")
    if app.endswith(":session_router"):
        name += ", ctx.session"
    if app.endswith(":batch_router"):
        name += ", batch handler"
    if concurrency != CONCURRENCY:
        name += f", concurrency {concurrency}"
    if profile_to:
        name += " (under py-spy)"

    return Figure(
        "consumer",
        name,
        (count - 1) / span if span else 0.0,
        "msg/s",
        messages=n,
        seconds=round(span, 3),
        baseline=BATCH_BASE if batch > 1 else BASE,
        extra={**extra_env, "handled": count},
    ).with_cpu(cpu_delta(before, after))


async def run(env: BenchEnv, results: Results, *, quick: bool, profile: Path | None = None) -> None:
    n = 5_000 if quick else 20_000
    print(
        f"consumer: {n} messages per variant, prefetch {PREFETCH}, concurrency {CONCURRENCY}",
        flush=True,
    )
    results.notes["consumer"] = {
        "messages": n,
        "prefetch": PREFETCH,
        "concurrency": CONCURRENCY,
        "batch": BATCH,
        "started": datetime.now(UTC).isoformat(),
    }
    engine = create_async_engine(env.database_url)
    async with engine.begin() as conn:
        await conn.run_sync(domain.create_all)
    await engine.dispose()
    for variant in (
        lambda: raw_consume(env, n, mode="ack"),
        lambda: raw_consume(env, n, mode="tx"),
        lambda: raw_consume(env, n, mode="batch"),
        lambda: worker_consume(env, n),
        lambda: worker_consume(env, n, app="bench.consumer_app:session_router"),
        lambda: worker_consume(env, n, batch=BATCH),
        lambda: worker_consume(env, n, batch=BATCH, app="bench.consumer_app:batch_router"),
        # Fewer handler slots, fuller natural batches (what the raw loop's one lock does).
        lambda: worker_consume(
            env, n, batch=BATCH, app="bench.consumer_app:batch_router", concurrency=2
        ),
    ):
        results.add(await variant())
    per_message = results.find("consumer", "postroom worker")
    batched = results.find("consumer", f"postroom worker, batch {BATCH}")
    if per_message and batched and per_message.value:
        results.notes["consumer"]["batch_over_per_message"] = round(
            batched.value / per_message.value, 3
        )
    if profile is not None:
        results.add(await worker_consume(env, n, profile_to=profile))
        results.add(
            await worker_consume(env, n, batch=BATCH, profile_to=profile.with_suffix(".batch.txt"))
        )
        results.add(
            await worker_consume(
                env,
                n,
                batch=BATCH,
                app="bench.consumer_app:batch_router",
                profile_to=profile.with_suffix(".batch-handler.txt"),
            )
        )
    _ = consumed
