"""Phase 4, end to end: commit -> handler latency at fixed offered rates.

A relay (``python -m postroom relay``) and a worker (``python -m postroom worker
bench.consumer_app:router``) run throughout; for each offered rate the load generator
(``bench.loadgen``, its own process) commits one-row transactions with one publish()
each and records when each COMMIT returned; the handler stamps when it ran. Latency
is the difference per order id. Three series: NOTIFY wake-up (relay poll interval 1 s
as a fallback only) with the default per-message worker, the same with a batching
worker (natural batches of up to 100), and polling every 100 ms with
``Outbox(notify=False)``. A tap queue (plain aio-pika, no database) bound to the same
topic splits the path: commit -> broker delivery is the relay's share, the rest the
worker's. A rate is sustained when every message was handled in time and p99 < 50 ms.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aio_pika
import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

from bench import write_path
from bench.consumer_app import domain
from bench.env import EXCHANGE, TOPIC, BenchEnv, CpuMeter, cpu_delta
from bench.procs import services
from bench.report import Figure, Results, quantile
from postroom import rabbit

# series: (NOTIFY on writes, relay poll interval, worker settings)
SERIES: dict[str, tuple[str, str, dict[str, str]]] = {
    "notify": ("1", "1.0", {}),
    "notify, batching worker": (
        "1",
        "1.0",
        {"POSTROOM_WORKER_BATCH_SIZE": "100", "POSTROOM_WORKER_BATCH_WAIT": "0"},
    ),
    "poll 100 ms": ("0", "0.1", {}),
}
TAP_QUEUE = "bench.e2e-tap"


async def one_rate(
    env: BenchEnv,
    series: str,
    rate: int,
    seconds: float,
    first: int,
    roles: dict[str, int],
    tap: dict[int, float],
) -> Figure:
    notify, _, _ = SERIES[series]
    meter = CpuMeter(env.database)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "commits.json"
        pids = list(roles.values())
        before = meter.snapshot(pids)
        gen = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.loadgen",
            env.database_url,
            str(rate),
            str(seconds),
            str(first),
            notify,
            str(out),
            env.event_loop,
        )
        await gen.wait()
        if gen.returncode != 0:
            raise RuntimeError(f"load generator failed ({gen.returncode})")
        report = json.loads(out.read_text())
    commits = {order_id: t for order_id, t in report["commits"]}
    conn = await asyncpg.connect(env.dsn)
    try:
        deadline = time.time() + 15.0
        while time.time() < deadline:
            handled = await conn.fetchval(
                "SELECT count(*) FROM bench_consumed WHERE order_id >= $1", first
            )
            if handled >= len(commits):
                break
            await asyncio.sleep(0.2)
        after = meter.snapshot(pids)
        spent, was = after.groups["client"], before.groups["client"]
        by_role = {
            role: round(spent.get(pid, 0.0) - was.get(pid, 0.0), 3) for role, pid in roles.items()
        }
        by_role["load generator"] = round(report.get("cpu_seconds", 0.0), 3)
        rows = await conn.fetch(
            "SELECT order_id, handled_at FROM bench_consumed WHERE order_id >= $1", first
        )
        # Leave nothing behind for the next rate: a backlog would inflate its latency.
        await conn.execute("TRUNCATE bench_consumed, postroom.inbox, postroom.outbox")
    finally:
        await conn.close()
    latencies = sorted(
        (r["handled_at"] - commits[r["order_id"]]) * 1000 for r in rows if r["order_id"] in commits
    )
    to_broker = sorted((tap[k] - t) * 1000 for k, t in commits.items() if k in tap)
    tap.clear()
    complete = len(latencies) >= len(commits)
    p50, p95, p99 = (
        (quantile(latencies, q) for q in (0.5, 0.95, 0.99)) if len(latencies) > 10 else (0, 0, 0)
    )
    return Figure(
        "e2e",
        f"{series} @ {rate}/s",
        p99,
        "ms p99",
        messages=len(latencies),
        seconds=seconds,
        extra={
            "series": series,
            "offered": rate,
            "achieved": round(report["achieved"], 1),
            "p50": round(p50, 2),
            "p95": round(p95, 2),
            "p99": round(p99, 2),
            "handled": len(latencies),
            "committed": len(commits),
            "sustained": complete and p99 < 50,
            "commit_to_broker_p50": round(quantile(to_broker, 0.5), 2) if to_broker else None,
            "commit_to_broker_p99": round(quantile(to_broker, 0.99), 2) if to_broker else None,
            "cpu_ms_per_message": {
                role: round(1000 * cpu / max(1, len(latencies)), 3) for role, cpu in by_role.items()
            },
        },
    ).with_cpu(cpu_delta(before, after))


async def run(env: BenchEnv, results: Results, *, quick: bool) -> None:
    rates = [100, 300, 500, 1000] if quick else [100, 200, 300, 500, 1000, 2000]
    seconds = 3.0 if quick else 10.0
    print(f"e2e: offered rates {rates}, {seconds:.0f} s each", flush=True)
    results.notes["e2e"] = {"rates": rates, "seconds_per_rate": seconds}
    engine = create_async_engine(env.database_url)
    async with engine.begin() as conn:
        await conn.run_sync(domain.create_all)
        await conn.run_sync(write_path.domain.create_all)
    await engine.dispose()
    first = 1_000_000
    connection = await aio_pika.connect(env.amqp_url)
    await rabbit.declare_exchange(connection, EXCHANGE)
    channel = await connection.channel()
    queue = await channel.declare_queue(TAP_QUEUE, exclusive=True)
    await queue.bind(EXCHANGE, routing_key=TOPIC)
    tap: dict[int, float] = {}

    async def on_tap(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        tap[int(message.body[12 : message.body.index(b",")])] = time.time()
        await message.ack()

    await queue.consume(on_tap)
    try:
        for series, (_, poll, worker_env) in SERIES.items():
            first = await _series(
                env, results, series, poll, worker_env, rates, seconds, first, tap
            )
    finally:
        await connection.close()
    sustained = [
        f.extra["offered"]
        for f in results.phase("e2e")
        if f.extra["series"] == "notify" and f.extra["sustained"]
    ]
    results.notes["e2e"]["highest_sustained_notify"] = max(sustained) if sustained else None


async def _series(
    env: BenchEnv,
    results: Results,
    series: str,
    poll: str,
    worker_env: dict[str, str],
    rates: list[int],
    seconds: float,
    first: int,
    tap: dict[int, float],
) -> int:
    async with (
        services(
            env,
            ["relay"],
            ready_marker="relay.connected",
            extra_env={"POSTROOM_POLL_INTERVAL": poll},
        ) as relays,
        services(
            env,
            ["worker", "bench.consumer_app:router"],
            ready_marker="worker.consuming",
            extra_env=worker_env,
        ) as workers,
    ):
        roles = {"relay": relays[0].pid, "worker": workers[0].pid}
        for rate in rates:
            figure = await one_rate(env, series, rate, seconds, first, roles, tap)
            first += 1_000_000
            results.add(figure)
            x = figure.extra
            print(
                f"           p50 {x['p50']} ms, p95 {x['p95']} ms, handled "
                f"{x['handled']}/{x['committed']}, achieved {x['achieved']}/s, "
                f"commit->broker p50 {x['commit_to_broker_p50']} ms, "
                f"CPU ms/msg {x['cpu_ms_per_message']}",
                flush=True,
            )
    return first
