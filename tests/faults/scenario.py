"""One fault scenario end to end: the stage it runs on, and the run with its checks.

``run_scenario`` starts the fleet on a :class:`Stage`, commits the workload while the
faults are injected in seeded rounds, heals, waits for the backlog to drain (the liveness
bound), stops the fleet and asserts every invariant on the history. The scenario modules
(``tests/test_faults.py``, ``tests/test_cluster.py``) only say what to run where.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from postroom.settings import Settings
from tests.conftest import create_tables_at_head
from tests.faults import chaos, servers
from tests.faults.workload import (
    Chaos,
    Fault,
    Figures,
    Fleet,
    Writers,
    check,
    declare_topology,
    drain,
    foreign,
    inject,
    prepare_schema,
    read_history,
)

FLEET_ENV = {"POSTROOM_WORKER_CONCURRENCY": "8"}


@dataclass
class Stage:
    """What a scenario runs against."""

    procs: Settings
    """Settings of the relay and worker processes (maybe through proxies)."""
    writer_url: str
    """SQLAlchemy URL for the writers (maybe through a proxy)."""
    dsn: str
    """Direct asyncpg DSN (superuser) to the run's database: checks and backend kills."""
    amqp_url: str
    """Direct URL of the test vhost: topology and close_all_connections."""
    extra: dict[str, Any] = field(default_factory=dict)


async def private_database(
    postgres: servers.PrivatePostgres, name: str, settings: Settings
) -> tuple[str, str]:
    """Create database *name* on a private cluster with postroom's and the fault app's
    tables in ``settings.schema_name``; return its asyncpg DSN and SQLAlchemy URL."""
    conn = await asyncpg.connect(postgres.dsn(), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = postgres.dsn(name)
    database_url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn2:
            await conn2.execute(text(f'CREATE SCHEMA "{settings.schema_name}"'))
            await conn2.run_sync(create_tables_at_head, settings.schema_name)
    finally:
        await engine.dispose()
    await prepare_schema(dsn, settings.schema_name)
    return dsn, database_url


async def run_scenario(
    name: str,
    stage: Stage,
    logdir: Path,
    *,
    seed: int,
    messages: int,
    duration: float,
    faults: Sequence[Fault],
    gap: tuple[float, float],
    relays: int = 2,
    workers: int = 2,
    drain_timeout: float = 90.0,
    min_faults: int = 1,
    writers: dict[str, Any] | None = None,
    rounds: int = 1,
    fleet_env: dict[str, str] | None = None,
) -> Figures:
    """Run one scenario end to end and assert every invariant; return its figures."""
    rng = random.Random(seed)
    rounds = max(rounds, -(-min_faults // len(faults)))  # enough rounds for min_faults
    settings = stage.procs
    schema = settings.schema_name
    await declare_topology(settings, stage.amqp_url)
    fleet = Fleet(settings, logdir, **{**FLEET_ENV, **(fleet_env or {})})
    ctx = Chaos(
        rng=rng, fleet=fleet, amqp_url=stage.amqp_url, admin_dsn=stage.dsn, extra=stage.extra
    )
    producer = Writers(stage.writer_url, settings, seed=rng.randrange(1 << 30), **(writers or {}))
    ctx.extra.update(
        writers=producer,
        writer_url=stage.writer_url,
        prefetch=settings.worker_prefetch,
        max_body_bytes=settings.max_body_bytes,
        exchange=settings.exchange,
        amqp_tls_ca=settings.amqp_tls_ca,
    )
    started = time.monotonic()
    fleet.start(relays, workers)
    try:
        production = asyncio.create_task(producer.run(messages, duration))
        try:
            await inject(ctx, faults, until=production.done, gap=gap, rounds=rounds)
        finally:
            if not production.done():
                production.cancel()
            ledger = await production
        chaos.heal(ctx)
        drained = await drain(stage.dsn, schema, ledger, timeout=drain_timeout)
    finally:
        await fleet.stop()
    histories = await read_history(stage.dsn, schema, fleet.deliveries())
    report = check(ledger, histories)
    strays = foreign(ledger, histories)
    figures = Figures(
        scenario=name,
        seed=seed,
        seconds=time.monotonic() - started,
        drain_seconds=drained,
        faults=ctx.injected,
        report=report,
        writer_errors=ledger.errors,
        restarts=fleet.restarts,
        scheduled=ctx.scheduled,
        effective=ctx.effective,
    )
    print(f"\n{report.table()}\n{figures.summary()}")
    assert not fleet.unexpected, "processes exited unexpectedly:\n" + "\n".join(fleet.unexpected)
    assert report.ok, report.table()
    assert not strays, "malformed or oversized input mishandled:\n" + "\n".join(strays)
    assert report.total.dead == 2 * len(ledger.poison), "both consumers dead-letter each poison"
    assert sum(ctx.injected.values()) >= min_faults, f"too few faults injected: {ctx.log}"
    assert report.committed >= messages // 2, "most of the workload should have committed"
    return figures
