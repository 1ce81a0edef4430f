"""Phase 1, relay drain: a pre-filled outbox to RabbitMQ, beside raw aio-pika publishing.

Baselines, same exchange, quorum queue, body, properties and window:
* ``raw publish, no confirms``: the physical ceiling of one Python client here;
* ``raw publish, confirms``: hand-written aio-pika, ``window`` messages in flight,
  ``mandatory``, awaiting every confirm (measured first and last; their mean is the
  baseline, and their spread shows the drift during the phase).
The relays run as real ``python -m postroom relay`` subprocesses started before the
fill; the clock starts at the NOTIFY after the fill commits and stops when the outbox
is empty, so process start-up and the fill are not counted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aio_pika
import asyncpg
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from bench import payload
from bench.env import EXCHANGE, TOPIC, BenchEnv, CpuMeter, cpu_delta
from bench.procs import services, start_py_spy, stop_py_spy
from bench.report import Figure, Results
from postroom import rabbit

WINDOW = 500  # the relay's default batch size: confirms in flight at once
BASE = "raw publish, confirms"


async def raw_publish(env: BenchEnv, n: int, *, confirms: bool, window: int = WINDOW) -> Figure:
    meter = CpuMeter(env.database)
    connection = await aio_pika.connect(env.amqp_url)
    try:
        await payload.declare_sink(connection)
        channel = await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        async with payload.purging(connection) as queue_stats:
            before = meter.snapshot()
            started = time.perf_counter()
            for start in range(0, n, window):
                await asyncio.gather(
                    *(
                        exchange.publish(payload.amqp_message(i), TOPIC, mandatory=True)
                        for i in range(start, min(start + window, n))
                    )
                )
            seconds = time.perf_counter() - started
            after = meter.snapshot()
        await channel.close()
    finally:
        await connection.close()
    name = BASE if confirms else "raw publish, no confirms"
    return Figure(
        "relay",
        name,
        n / seconds,
        "msg/s",
        messages=n,
        seconds=round(seconds, 3),
        baseline=None if name == BASE else BASE,
        extra={"queue": queue_stats},
    ).with_cpu(cpu_delta(before, after))


def _outgoing(i: int) -> rabbit.Outgoing:
    m = payload.message(i)
    return rabbit.Outgoing(
        exchange=EXCHANGE,
        routing_key=TOPIC,
        body=m.body,
        message_id=str(m.message_id),
        topic=m.topic,
        timestamp=m.occurred_at,
        content_type=m.content_type,
        correlation_id=m.correlation_id,
        headers=m.amqp_headers(),
    )


async def frames_publish(env: BenchEnv, n: int, *, window: int = WINDOW) -> Figure:
    """The floor of client work: a window's frames marshalled and written at once,
    no confirms, straight onto the aiormq channel (what no library call goes below)."""
    meter = CpuMeter(env.database)
    connection = await aio_pika.connect(env.amqp_url)
    try:
        await payload.declare_sink(connection)
        channel = await connection.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        method = spec.Basic.Publish(exchange=EXCHANGE, routing_key=TOPIC, mandatory=True)
        async with payload.purging(connection) as queue_stats:
            before = meter.snapshot()
            started = time.perf_counter()
            for start in range(0, n, window):
                frames: list[object] = []
                for i in range(start, min(start + window, n)):
                    out = _outgoing(i)
                    frames += (
                        method,
                        ContentHeader(properties=rabbit._properties(out), body_size=len(out.body)),
                        ContentBody(out.body),
                    )
                drained = raw.create_future()
                await raw.write_queue.put(
                    ChannelFrame.marshall(
                        channel_number=raw.number, frames=frames, drain_future=drained
                    )
                )
                await drained
            await channel.close()  # the close handshake follows every publish frame
            seconds = time.perf_counter() - started
            after = meter.snapshot()
    finally:
        await connection.close()
    return Figure(
        "relay",
        "raw frames, no confirms (ceiling)",
        n / seconds,
        "msg/s",
        messages=n,
        seconds=round(seconds, 3),
        baseline=BASE,
        extra={"queue": queue_stats},
    ).with_cpu(cpu_delta(before, after))


async def publisher_alone(env: BenchEnv, n: int, *, window: int = WINDOW) -> Figure:
    """postroom's ConfirmingPublisher without the database: what the relay adds on top."""
    meter = CpuMeter(env.database)
    connection = await rabbit.connect(env.amqp_url, name="bench-publisher")
    try:
        await payload.declare_sink(connection)
        publisher = await rabbit.ConfirmingPublisher.open(connection)
        async with payload.purging(connection) as queue_stats:
            before = meter.snapshot()
            started = time.perf_counter()
            for start in range(0, n, window):
                batch = [_outgoing(i) for i in range(start, min(start + window, n))]
                outcomes = await publisher.publish_many(batch)
                if any(outcomes):
                    raise RuntimeError(f"publish failed: {next(o for o in outcomes if o)}")
            seconds = time.perf_counter() - started
            after = meter.snapshot()
        await publisher.close()
    finally:
        await connection.close()
    return Figure(
        "relay",
        "postroom publisher, no database",
        n / seconds,
        "msg/s",
        messages=n,
        seconds=round(seconds, 3),
        baseline=BASE,
        extra={"queue": queue_stats},
    ).with_cpu(cpu_delta(before, after))


async def relay_drain(
    env: BenchEnv,
    n: int,
    *,
    relays: int,
    keys: int = 0,
    profile_to: Path | None = None,
) -> Figure:
    """Drain *n* rows with *relays* relay processes; optionally py-spy the first one."""
    meter = CpuMeter(env.database)
    conn = await asyncpg.connect(env.dsn)
    amqp = await aio_pika.connect(env.amqp_url)
    try:
        await payload.declare_sink(amqp)
        await conn.execute("VACUUM postroom.outbox")
        # A long poll interval: the relays wake on our NOTIFY, not on a timer.
        async with services(
            env,
            ["relay"],
            count=relays,
            ready_marker="relay.connected",
            extra_env={"POSTROOM_POLL_INTERVAL": "30"},
        ) as procs:
            await payload.fill_outbox(env.dsn, n, keys=keys, notify=False)
            spy = await start_py_spy(procs[0].pid, profile_to) if profile_to else None
            async with payload.purging(amqp) as queue_stats:
                pids = [p.pid for p in procs]
                before = meter.snapshot(pids)
                started = time.perf_counter()
                await conn.execute("SELECT pg_notify('postroom.outbox', '')")
                deadline = started + max(120.0, n / 500)
                while await payload.outbox_head(conn) is not None:
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"relays did not drain {n} rows in time")
                    for p in procs:
                        if p.proc.returncode is not None:
                            raise RuntimeError(f"{p.name} died:\n" + "\n".join(p.lines[-15:]))
                    await asyncio.sleep(0.02)
                seconds = time.perf_counter() - started
                after = meter.snapshot(pids)
            if spy is not None:
                await stop_py_spy(spy)
    finally:
        await amqp.close()
        await conn.close()
    name = f"relay x{relays}" + (f", {keys} keys" if keys else "")
    if profile_to:
        name += " (under py-spy)"
    return Figure(
        "relay",
        name,
        n / seconds,
        "msg/s",
        messages=n,
        seconds=round(seconds, 3),
        baseline=BASE,
        extra={"queue": queue_stats, "relays": relays, "keys": keys},
    ).with_cpu(cpu_delta(before, after))


async def run(env: BenchEnv, results: Results, *, quick: bool, profile: Path | None) -> None:
    n = 20_000 if quick else 100_000
    rounds = 1 if quick else 2
    print(f"relay drain: {n} rows, window {WINDOW}, {rounds} round(s)", flush=True)
    results.notes["relay"] = {
        "rows": n,
        "window": WINDOW,
        "rounds": rounds,
        "body_bytes": payload.BODY_BYTES,
        "queue": "one durable quorum queue, purged every 0.5 s while publishing",
    }
    variants = [
        lambda: frames_publish(env, n),
        lambda: raw_publish(env, n, confirms=False),
        lambda: raw_publish(env, n, confirms=True),
        lambda: publisher_alone(env, n),
        lambda: relay_drain(env, n, relays=1),
        lambda: relay_drain(env, n, relays=2),
        lambda: relay_drain(env, n, relays=4),
        lambda: relay_drain(env, n, relays=1, keys=1000),
    ]
    runs: dict[str, list[Figure]] = {}
    for round_ in range(rounds):
        # Alternate the order each round, so a drift in machine load hits both ends.
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            figure = await variant()
            runs.setdefault(figure.name, []).append(figure)
            print(f"  relay    {figure.name:34} {figure.value:10.1f} msg/s", flush=True)
    for figures in runs.values():
        results.figures.append(merge(figures))
    if profile is not None:
        results.add(await relay_drain(env, n, relays=1, profile_to=profile))


def merge(figures: list[Figure]) -> Figure:
    """One figure from repeated runs: total messages over total time, runs kept."""
    first = figures[0]
    if len(figures) == 1:
        return first
    messages = sum(f.messages for f in figures)
    seconds = sum(f.seconds for f in figures)
    cpu: dict[str, float] = {}
    for f in figures:
        for key, value in f.cpu.items():
            cpu[key] = round(cpu.get(key, 0.0) + value, 3)
    return Figure(
        first.phase,
        first.name,
        messages / seconds,
        first.unit,
        messages=messages,
        seconds=round(seconds, 3),
        baseline=first.baseline,
        extra={**first.extra, "runs": [round(f.value, 1) for f in figures]},
    ).with_cpu(cpu)
