"""Fault-injection scenarios: real relays and workers under faults, then the history check.

Each scenario commits a bounded workload while injecting its faults, heals, waits for the
backlog to drain (the liveness bound), stops the fleet and checks the whole history:
lost 0, phantom 0, applied twice 0, dead letters exactly the poison set, per-key order for
the ordered consumer. ``pytest -s`` shows each scenario's table and figures.

The default set is short (CI); ``--long`` adds the long mixed run (docs/guarantees.md);
``--seed N`` (or FAULTS_SEED=N) replays a scenario's fault sequence.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr

from postroom import faults as points
from postroom.settings import Settings
from tests.apps.faultapp import router
from tests.faults import chaos, hazards, servers
from tests.faults.proxy import FaultProxy
from tests.faults.scenario import Stage, private_database, run_scenario
from tests.faults.workload import (
    Figures,
    prepare_schema,
    via,
)
from tests.helpers import delete_queues


@pytest.fixture
async def stage(settings: Settings) -> AsyncIterator[Stage]:
    """The shared services, a fresh schema with the ledger tables, clean app queues."""
    amqp_url = settings.amqp_url.get_secret_value()
    await prepare_schema(settings.asyncpg_dsn, settings.schema_name)
    await delete_queues(amqp_url, router)
    yield Stage(
        procs=settings,
        writer_url=settings.database_url.get_secret_value(),
        dsn=settings.asyncpg_dsn,
        amqp_url=amqp_url,
    )
    await delete_queues(amqp_url, router)


@pytest.fixture
async def proxied(stage: Stage) -> AsyncIterator[Stage]:
    """The shared services behind two FaultProxies (Postgres, RabbitMQ), writers included."""
    pg = urlsplit(stage.dsn)
    amqp = urlsplit(stage.amqp_url)
    async with (
        FaultProxy(pg.hostname or "127.0.0.1", pg.port or 5432) as pg_proxy,
        FaultProxy(amqp.hostname or "127.0.0.1", amqp.port or 5672) as amqp_proxy,
    ):
        database_url = via(stage.procs.database_url.get_secret_value(), pg_proxy)
        yield Stage(
            procs=stage.procs.model_copy(
                update={
                    "database_url": SecretStr(database_url),
                    "amqp_url": SecretStr(via(stage.amqp_url, amqp_proxy)),
                }
            ),
            writer_url=database_url,
            dsn=stage.dsn,
            amqp_url=stage.amqp_url,
            extra={"pg_proxy": pg_proxy, "amqp_proxy": amqp_proxy},
        )


@pytest.fixture
async def private(settings: Settings, names: str) -> AsyncIterator[Stage]:
    """A private RabbitMQ node and PostgreSQL cluster, free to crash and restart."""
    rabbit = servers.PrivateRabbit()
    postgres = servers.PrivatePostgres()
    try:
        await asyncio.gather(rabbit.start(), postgres.init())
        amqp_url = await rabbit.add_vhost(f"postroom-test-{names}")
        dsn, database_url = await private_database(postgres, "postroom_faults", settings)
        yield Stage(
            procs=settings.model_copy(
                update={
                    "database_url": SecretStr(database_url),
                    "amqp_url": SecretStr(amqp_url),
                }
            ),
            writer_url=database_url,
            dsn=dsn,
            amqp_url=amqp_url,
            extra={"rabbit": rabbit, "postgres": postgres},
        )
    finally:
        await asyncio.gather(rabbit.destroy(), postgres.destroy())


@pytest.fixture
async def private_tls(settings: Settings, names: str) -> AsyncIterator[Stage]:
    """:func:`private`, speaking TLS only: a throwaway CA, ``ssl=on``/``hostssl``
    PostgreSQL and an AMQPS-only RabbitMQ. The processes verify both peers
    (``sslmode=verify-full``, ``amqps://`` with ``POSTROOM_AMQP_TLS_CA``); the writers
    and the checks connect encrypted without verifying (asyncpg's ``prefer``)."""
    ca = await servers.ThrowawayCA().create()
    cert, key = await ca.issue("server", dns=("localhost",), ips=("127.0.0.1",))
    rabbit = servers.PrivateRabbit(tls=(ca.cert, cert, key))
    postgres = servers.PrivatePostgres(tls=(cert, key))
    try:
        await asyncio.gather(rabbit.start(), postgres.init())
        amqp_url = await rabbit.add_vhost(f"postroom-test-{names}")
        dsn, database_url = await private_database(postgres, "postroom_faults", settings)
        yield Stage(
            procs=settings.model_copy(
                update={
                    "database_url": SecretStr(
                        f"{database_url}?sslmode=verify-full&sslrootcert={ca.cert}"
                    ),
                    "amqp_url": SecretStr(amqp_url),
                    "amqp_tls_ca": str(ca.cert),
                }
            ),
            writer_url=f"{database_url}?ssl=require",
            dsn=dsn,
            amqp_url=amqp_url,
            extra={"rabbit": rabbit, "postgres": postgres},
        )
    finally:
        await asyncio.gather(rabbit.destroy(), postgres.destroy())
        ca.destroy()


@pytest.fixture
async def private_proxied(private_tls: Stage) -> AsyncIterator[Stage]:
    """The private TLS servers, each behind a FaultProxy: every fault kind applies at once,
    and every proxy fault cuts TLS connections (the processes' and the writers')."""
    private = private_tls
    async with (
        FaultProxy("127.0.0.1", private.extra["postgres"].port) as pg_proxy,
        FaultProxy("127.0.0.1", private.extra["rabbit"].port) as amqp_proxy,
    ):
        yield Stage(
            procs=private.procs.model_copy(
                update={
                    "database_url": SecretStr(
                        via(private.procs.database_url.get_secret_value(), pg_proxy)
                    ),
                    "amqp_url": SecretStr(via(private.amqp_url, amqp_proxy)),
                }
            ),
            writer_url=via(private.writer_url, pg_proxy),
            dsn=private.dsn,
            amqp_url=private.amqp_url,
            extra={**private.extra, "pg_proxy": pg_proxy, "amqp_proxy": amqp_proxy},
        )


@pytest.mark.timeout(300)  # the liveness bound is asserted inside, tighter
async def test_sigkill_relays_and_workers_at_random(stage, tmp_path, seed):
    await run_scenario(
        "sigkill",
        stage,
        tmp_path,
        seed=seed,
        messages=600,
        duration=12,
        faults=[chaos.kill_relay, chaos.kill_worker],
        gap=(0.8, 2.0),
        min_faults=4,
    )


@pytest.mark.timeout(300)  # the liveness bound is asserted inside, tighter
async def test_sigkill_at_named_crash_points(stage, tmp_path, seed):
    """Extra processes armed with every named point join in rounds and die at their point."""
    figures = await run_scenario(
        "crash-points",
        stage,
        tmp_path,
        seed=seed,
        # A workload long enough that armed workers, slow to start on a busy machine,
        # still find work to die on.
        messages=1_200,
        duration=30,
        faults=[chaos.crash_at_all(sorted(points.POINTS), timeout=20)],
        gap=(0.2, 0.5),
        writers={"poison_every": 13},
        min_faults=6,
    )
    reached = {kind.split(":", 1)[1] for kind in figures.faults if kind.startswith("crash_at:")}
    assert reached == points.POINTS, f"points never reached: {points.POINTS - reached}"


@pytest.mark.timeout(300)  # the liveness bound is asserted inside, tighter
async def test_broker_connection_closes_and_backend_kills(stage, tmp_path, seed):
    await run_scenario(
        "server-kills",
        stage,
        tmp_path,
        seed=seed,
        messages=600,
        duration=12,
        faults=[chaos.close_connections, chaos.terminate_backends],
        gap=(0.8, 2.0),
        min_faults=4,
    )


@pytest.mark.timeout(300)  # the liveness bound is asserted inside, tighter
async def test_network_faults_through_proxies(proxied, tmp_path, seed):
    await run_scenario(
        "proxy",
        proxied,
        tmp_path,
        seed=seed,
        messages=600,
        duration=18,
        faults=[*chaos.proxy_faults("pg"), *chaos.proxy_faults("amqp")],
        gap=(0.3, 1.0),
        min_faults=4,
    )


@pytest.mark.timeout(300)  # the liveness bound is asserted inside, tighter
async def test_private_servers_alarm_and_restarts(private, tmp_path, seed):
    await run_scenario(
        "private-servers",
        private,
        tmp_path,
        seed=seed,
        messages=500,
        duration=20,
        faults=[chaos.postgres_crash, chaos.broker_alarm, chaos.broker_restart],
        gap=(1.0, 2.0),
        min_faults=3,
        drain_timeout=120,
    )


MIXED_SHORT = [
    chaos.kill_relay,
    chaos.kill_worker,
    chaos.crash_at(points.RELAY_AFTER_CONFIRM),
    chaos.crash_at(points.WORKER_AFTER_COMMIT),
    chaos.close_connections,
    chaos.terminate_backends,
    *chaos.proxy_faults("pg"),
    *chaos.proxy_faults("amqp"),
]


@pytest.mark.timeout(300)  # the liveness bound is asserted inside, tighter
@pytest.mark.parametrize(
    "fleet_env",
    [
        {},
        # One transaction per batch; a failed batch is rolled back and dispatched one
        # message per transaction (the workload has poison messages and shared rows).
        {"POSTROOM_WORKER_BATCH_SIZE": "25", "POSTROOM_WORKER_BATCH_WAIT": "0.005"},
        # The same, with faults.audit a batch handler (one call per batch, batch=True).
        {
            "POSTROOM_WORKER_BATCH_SIZE": "25",
            "POSTROOM_WORKER_BATCH_WAIT": "0.005",
            "app": "tests.apps.faultapp:batch_router",
        },
    ],
    ids=["per-message-workers", "batching-workers", "batch-handler-workers"],
)
async def test_mixed_faults_short(proxied, tmp_path, seed, fleet_env):
    await run_scenario(
        "mixed-short"
        + ("-batched" if fleet_env else "")
        + ("-handler" if "app" in fleet_env else ""),
        proxied,
        tmp_path,
        seed=seed,
        messages=800,
        duration=18,
        faults=MIXED_SHORT,
        gap=(0.3, 1.2),
        min_faults=6,
        fleet_env=fleet_env,
    )


HAZARDS = [
    hazards.outbox_lock,
    hazards.long_transaction,
    hazards.clock_skew,
    hazards.slow_consumer,
    hazards.bad_input,
    hazards.restart_fleet,
]

EVERY_KIND = [
    *MIXED_SHORT,
    chaos.crash_at(points.WORKER_IN_HANDLER),
    chaos.crash_at(points.WORKER_AFTER_RETRY_COMMIT),
    chaos.crash_at(points.WORKER_AFTER_DEAD_LETTER_COMMIT),
    chaos.broker_alarm,
    chaos.broker_restart,
    chaos.postgres_crash,
    chaos.proxy_cut_mid_record("pg"),
    chaos.proxy_cut_mid_record("amqp"),
    *HAZARDS,
]
"""Every fault kind of the matrix (docs/guarantees.md's coverage table). The stage it runs
on speaks TLS (:func:`private_proxied`), so every proxy kind cuts TLS connections."""


def assert_every_kind(figures: Figures, rounds: int) -> None:
    """Each kind ran at least *rounds* times (by construction); report which never bit."""
    scheduled = figures.scheduled
    short = {name: n for name, n in scheduled.items() if n < rounds}
    assert len(scheduled) == len(EVERY_KIND) and not short, f"kinds run too rarely: {short}"


@pytest.mark.timeout(420)  # the liveness bound is asserted inside, tighter
async def test_every_fault_kind_short(private_proxied, tmp_path, seed):
    """CI's version of the long run: every kind of the matrix once, in a seeded order."""
    figures = await run_scenario(
        "every-kind-short",
        private_proxied,
        tmp_path,
        seed=seed,
        messages=1_500,
        duration=45,
        faults=EVERY_KIND,
        gap=(0.2, 0.8),
        # Every kind runs once (asserted below); not all bite in a short run: an armed
        # worker may find no work before its 30 s are up once the writers are done.
        min_faults=len(EVERY_KIND) * 2 // 3,
        drain_timeout=120,
    )
    assert_every_kind(figures, 1)


LONG_ROUNDS = 8


@pytest.mark.slow
@pytest.mark.timeout(7200)  # the 100k run took 73 min on a shared 2-core machine
async def test_mixed_faults_long(private_proxied, tmp_path, seed):
    """The figures in docs/guarantees.md: >= 100k messages, >= 200 faults, every kind at
    least LONG_ROUNDS times, on a private broker and database (restarts allowed) behind
    fault proxies."""
    figures = await run_scenario(
        "mixed-long",
        private_proxied,
        tmp_path,
        seed=seed,
        messages=112_000,
        duration=1_800,
        faults=EVERY_KIND,
        gap=(1.5, 4.5),
        min_faults=200,
        drain_timeout=1_200,
        rounds=LONG_ROUNDS,
    )
    assert_every_kind(figures, LONG_ROUNDS)
    assert figures.report.committed >= 100_000, "the long run must commit at least 100k messages"
