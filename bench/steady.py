"""Phase 5, steady state (``--long``): a sustained load, watching the tables' size.

A relay and a worker run while the load generator commits at a fixed rate for ten
minutes (one with ``--quick``); every 10 s the phase samples the outbox and inbox row
counts, dead tuples and on-disk sizes. The outbox must stay near empty and its dead
tuples must be vacuumed away; the inbox grows by design until ``postroom prune``
removes rows older than the retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

from bench import write_path
from bench.consumer_app import domain
from bench.env import BenchEnv
from bench.procs import services
from bench.report import Figure, Results

RATE = 200
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
    conn = await asyncpg.connect(env.dsn)
    try:
        async with (
            services(env, ["relay"], ready_marker="relay.connected"),
            services(env, ["worker", "bench.consumer_app:router"], ready_marker="worker.consuming"),
        ):
            with tempfile.TemporaryDirectory() as tmp:
                gen = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.loadgen",
                    env.database_url,
                    str(RATE),
                    str(seconds),
                    "10000000",
                    "1",
                    str(Path(tmp) / "commits.json"),
                )
                started = time.time()
                while gen.returncode is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(gen.wait(), 10.0)
                    sample: dict[str, object] = {"t": round(time.time() - started, 1)}
                    for row in await conn.fetch(STATS):
                        for key in ("n_live_tup", "n_dead_tup", "bytes"):
                            sample[f"{row['relname']}_{key}"] = row[key]
                    sample["outbox_rows"] = await conn.fetchval(
                        "SELECT count(*) FROM postroom.outbox"
                    )
                    samples.append(sample)
                    print(f"  steady   {sample}", flush=True)
    finally:
        await conn.close()
    last = samples[-1] if samples else {}
    results.add(
        Figure(
            "steady",
            "outbox rows at the end",
            float(last.get("outbox_rows", 0) or 0),
            "rows",
            seconds=seconds,
            extra={"rate": RATE, "samples": samples},
        )
    )
    _plot(samples, out)


def _plot(samples: list[dict[str, object]], out: Path) -> None:
    if not samples:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    t = [s["t"] for s in samples]
    for key in ("outbox_rows", "outbox_n_dead_tup", "inbox_n_live_tup", "inbox_n_dead_tup"):
        ax.plot(t, [s.get(key, 0) for s in samples], label=key)
    ax.set_xlabel("seconds")
    ax.set_ylabel("rows")
    ax.legend(fontsize=7)
    ax.set_title(f"steady state at {RATE} msg/s", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "steady.png", dpi=90)
    plt.close(fig)
