"""Phase 5, steady state (``--long``): a sustained load, watching the tables' size.

A relay and a worker run while the load generator commits at a fixed rate for ten
minutes (one with ``--quick``); every 10 s the phase samples the outbox and inbox row
counts, dead tuples and on-disk sizes. ``prune.prune`` (what ``postroom prune`` runs)
deletes inbox rows older than a one-minute retention every minute, as a CronJob would
with a longer one. On a server without autovacuum (this machine's) it also vacuums the
tables, as ``postroom prune --vacuum`` would: otherwise the outbox, whose every row is
deleted once relayed, only grows (measured: 5 MB of dead rows after 7 minutes).
Bounded means: the outbox stays near empty, its dead tuples are vacuumed away, and
the inbox and both tables' sizes level off (the second half's peak no higher than the
first's, within 25%). Latency over the whole run is reported too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

from bench import write_path
from bench.consumer_app import domain
from bench.env import BenchEnv
from bench.procs import services
from bench.report import Figure, Results, quantile
from postroom import prune

RATE = 200
INBOX_RETENTION = timedelta(seconds=60)
PRUNE_EVERY = 60.0
STATS = """
SELECT relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid) AS bytes,
       last_autovacuum IS NOT NULL AS vacuumed
FROM pg_stat_user_tables WHERE schemaname = 'postroom' AND relname IN ('outbox', 'inbox')
"""


async def run(env: BenchEnv, results: Results, *, quick: bool, out: Path) -> None:
    seconds = 60.0 if quick else 600.0
    print(f"steady: {RATE} msg/s for {seconds:.0f} s", flush=True)
    engine = create_async_engine(env.database_url)
    async with engine.begin() as conn:
        await conn.run_sync(domain.create_all)
        await conn.run_sync(write_path.domain.create_all)
    await engine.dispose()
    samples: list[dict[str, object]] = []
    pruned = 0
    conn = await asyncpg.connect(env.dsn)
    engine = create_async_engine(env.database_url)
    autovacuum = await conn.fetchval("SHOW autovacuum") == "on"
    results.notes["steady"] = {"autovacuum": autovacuum, "phase_vacuums": not autovacuum}
    try:
        async with (
            services(env, ["relay"], ready_marker="relay.connected"),
            services(env, ["worker", "bench.consumer_app:router"], ready_marker="worker.consuming"),
        ):
            with tempfile.TemporaryDirectory() as tmp:
                commits_file = Path(tmp) / "commits.json"
                gen = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.loadgen",
                    env.database_url,
                    str(RATE),
                    str(seconds),
                    "10000000",
                    "1",
                    str(commits_file),
                    env.event_loop,
                )
                started = time.time()
                next_prune = started + PRUNE_EVERY
                while gen.returncode is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(gen.wait(), 10.0)
                    if time.time() >= next_prune:
                        next_prune += PRUNE_EVERY
                        report = await prune.prune(
                            engine,
                            "postroom",
                            inbox_retention=INBOX_RETENTION,
                            dead_letter_retention=timedelta(days=30),
                            actor="bench",
                        )
                        pruned += report.inbox
                        if not autovacuum:
                            await prune.vacuum(engine, "postroom")
                    sample = await _sample(conn, started)
                    samples.append(sample)
                    print(f"  steady   {sample}", flush=True)
                await asyncio.sleep(3.0)  # let the last messages through
                report_json = json.loads(commits_file.read_text())
            latency = await _latency(conn, report_json["commits"])
    finally:
        await conn.close()
        await engine.dispose()
    _report(results, samples, seconds, latency, pruned, report_json["achieved"])
    _plot(samples, out)


async def _sample(conn: asyncpg.Connection, started: float) -> dict[str, object]:
    sample: dict[str, object] = {"t": round(time.time() - started, 1)}
    for row in await conn.fetch(STATS):
        for key in ("n_live_tup", "n_dead_tup", "bytes"):
            sample[f"{row['relname']}_{key}"] = row[key]
    sample["outbox_rows"] = await conn.fetchval("SELECT count(*) FROM postroom.outbox")
    sample["inbox_rows"] = await conn.fetchval("SELECT count(*) FROM postroom.inbox")
    return sample


async def _latency(conn: asyncpg.Connection, commits: list[list[float]]) -> dict[str, float]:
    committed = {int(order_id): t for order_id, t in commits}
    rows = await conn.fetch(
        "SELECT order_id, handled_at FROM bench_consumed WHERE order_id >= 10000000"
    )
    values = sorted(
        (r["handled_at"] - committed[r["order_id"]]) * 1000
        for r in rows
        if r["order_id"] in committed
    )
    if len(values) < 100:
        return {"handled": len(values), "committed": len(committed)}
    return {
        "handled": len(values),
        "committed": len(committed),
        "p50": round(quantile(values, 0.5), 2),
        "p99": round(quantile(values, 0.99), 2),
        "max": round(values[-1], 2),
    }


def _report(
    results: Results,
    samples: list[dict[str, object]],
    seconds: float,
    latency: dict[str, float],
    pruned: int,
    achieved: float,
) -> None:
    if not samples:
        return
    half = len(samples) // 2

    def peak(key: str, part: list[dict[str, object]]) -> float:
        return float(max((int(s.get(key, 0) or 0) for s in part), default=0))

    extra: dict[str, object] = {
        "rate": RATE,
        "achieved": round(achieved, 1),
        "inbox_retention_seconds": INBOX_RETENTION.total_seconds(),
        "inbox_rows_pruned": pruned,
        "latency_ms": latency,
        "samples": samples,
    }
    bounded = True
    for key in ("outbox_rows", "outbox_n_dead_tup", "inbox_rows", "outbox_bytes", "inbox_bytes"):
        first, second = peak(key, samples[:half]), peak(key, samples[half:])
        extra[f"{key}_peak_first_half"] = first
        extra[f"{key}_peak_second_half"] = second
        if key != "outbox_rows" and second > max(first * 1.25, 1000):
            bounded = False
    extra["bounded"] = bounded
    results.add(
        Figure(
            "steady",
            "outbox rows, peak",
            peak("outbox_rows", samples),
            "rows",
            messages=int(latency.get("handled", 0)),
            seconds=seconds,
            extra=extra,
        )
    )
    print(
        f"  steady   bounded={bounded}, inbox peak {extra['inbox_rows_peak_first_half']:.0f}"
        f" -> {extra['inbox_rows_peak_second_half']:.0f}, latency {latency}",
        flush=True,
    )


def _plot(samples: list[dict[str, object]], out: Path) -> None:
    if not samples:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rows, size) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    t = [s["t"] for s in samples]
    for key in ("outbox_rows", "outbox_n_dead_tup", "inbox_rows", "inbox_n_dead_tup"):
        rows.plot(t, [s.get(key, 0) for s in samples], label=key)
    rows.set_xlabel("seconds")
    rows.set_ylabel("rows")
    rows.legend(fontsize=7)
    rows.set_title(f"rows at {RATE} msg/s", fontsize=9)
    for key in ("outbox_bytes", "inbox_bytes"):
        size.plot(t, [int(s.get(key, 0) or 0) / 1e6 for s in samples], label=key)
    size.set_xlabel("seconds")
    size.set_ylabel("MB on disk (with indexes)")
    size.legend(fontsize=7)
    size.set_title("table sizes", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "steady.png", dpi=90)
    plt.close(fig)
