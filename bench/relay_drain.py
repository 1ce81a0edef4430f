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
import contextlib
import signal
import sys
import time
from pathlib import Path

import aio_pika
import asyncpg

from bench import payload
from bench.env import EXCHANGE, TOPIC, BenchEnv, CpuMeter, cpu_delta
from bench.procs import services
from bench.report import Figure, Results

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
            spy = await _start_py_spy(procs[0].pid, profile_to) if profile_to else None
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
                await _stop_py_spy(spy)
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


async def _start_py_spy(pid: int, out: Path) -> asyncio.subprocess.Process:
    exe = Path(sys.executable).parent / "py-spy"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        str(exe),
        "record",
        "--pid",
        str(pid),
        "--rate",
        "250",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(1.0)  # let it attach before the clock starts
    return proc


async def _stop_py_spy(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 20)
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def run(env: BenchEnv, results: Results, *, quick: bool, profile: Path | None) -> None:
    n = 20_000 if quick else 100_000
    print(f"relay drain: {n} rows, window {WINDOW}", flush=True)
    results.notes["relay"] = {
        "rows": n,
        "window": WINDOW,
        "body_bytes": payload.BODY_BYTES,
        "queue": "one durable quorum queue, purged every 0.5 s while publishing",
    }
    results.add(await raw_publish(env, n, confirms=False))
    first = results.add(await raw_publish(env, n, confirms=True))
    for relays in (1, 2, 4):
        results.add(await relay_drain(env, n, relays=relays))
    results.add(await relay_drain(env, n, relays=1, keys=1000))
    last = await raw_publish(env, n, confirms=True)
    # The baseline is the mean of the first and last confirms runs; both are kept.
    first.extra["runs"] = [round(first.value, 1), round(last.value, 1)]
    first.value = (first.value + last.value) / 2
    first.seconds = round(first.seconds + last.seconds, 3)
    first.messages += last.messages
    first.with_cpu({k: first.cpu.get(k, 0) + v for k, v in last.cpu.items()})
    print(f"  relay    {BASE} (last run)              {last.value:10.1f} msg/s", flush=True)
    if profile is not None:
        results.add(await relay_drain(env, n, relays=1, profile_to=profile))
