"""The worker process on Kubernetes terms: health endpoints and SIGTERM under load."""

from __future__ import annotations

import asyncio
import re
import signal

import asyncpg
import pytest
from sqlalchemy import text

from postroom import Outbox
from postroom.settings import Settings
from tests.apps.billing import EFFECTS_DDL, Charge, router
from tests.helpers import (
    delete_queues,
    eventually,
    free_port,
    http_get,
    logs_of,
    running_relay,
    spawn,
    wait_exit,
)


@pytest.fixture
async def app(settings: Settings, sessions, amqp):
    async with sessions() as session, session.begin():
        await session.execute(text(EFFECTS_DDL.format(schema=settings.schema_name)))
    yield settings
    await delete_queues(amqp, router)


async def count(sessions, settings: Settings, sql: str) -> int:
    async with sessions() as session:
        return int((await session.execute(text(sql.format(s=settings.schema_name)))).scalar_one())


async def test_sigterm_mid_handler_finishes_in_flight_and_loses_nothing(app, sessions):
    port = free_port()
    worker_settings = app.model_copy(update={"shutdown_timeout": 10.0, "worker_concurrency": 4})
    box = Outbox.from_settings(app)
    async with sessions() as session, session.begin():
        for i in range(40):
            await box.publish(session, Charge(id=i, mode="slow", sleep=0.5))
    async with running_relay(app):
        worker = spawn(
            worker_settings, "worker", "tests.apps.billing:router", POSTROOM_HEALTH_PORT=str(port)
        )
        try:
            await eventually(lambda: _status(port, "/readyz", 200), timeout=30)
            status, _, body = await http_get(port, "/metrics")
            assert status == 200 and b"postroom_consumer_messages_total" in body
            # Wait until slow handlers are mid-transaction, then ask the worker to stop.
            await eventually(lambda: _handlers_running(app), timeout=30)
            worker.send_signal(signal.SIGTERM)
            applied_at_sigterm = await count(sessions, app, APPLIED)
            started = asyncio.get_running_loop().time()
            code = await wait_exit(worker, timeout=30)
            took = asyncio.get_running_loop().time() - started
        finally:
            if worker.poll() is None:
                worker.kill()
        assert code == 0, logs_of(worker)
        assert took < worker_settings.shutdown_timeout + 5
        # The SIGTERM caught work in flight, and the drain finished it (committed, acked).
        draining = re.search(r"worker\.draining.*?inflight\W+(\d+)", logs_of(worker, tail=10**7))
        assert draining and int(draining.group(1)) >= 1, logs_of(worker)
        assert await count(sessions, app, APPLIED) > applied_at_sigterm
        assert await count(sessions, app, 'SELECT count(*) FROM "{s}".dead_letters') == 0
        # Everything not applied was requeued: a second worker finishes the rest, once each.
        second = spawn(app, "worker", "tests.apps.billing:router")
        try:
            await eventually(lambda: _all_applied(sessions, app), timeout=60)
        finally:
            second.terminate()
            assert await wait_exit(second) == 0
    assert (
        await count(
            sessions, app, "SELECT count(*) FROM \"{s}\".effects WHERE consumer = 'billing.charge'"
        )
        == 40
    )
    assert await count(sessions, app, 'SELECT count(*) FROM "{s}".dead_letters') == 0


APPLIED = "SELECT count(*) FROM \"{s}\".effects WHERE consumer = 'billing.charge'"


async def _handlers_running(settings: Settings) -> bool:
    """Some handler of the worker is inside its transaction (it wrote; not committed)."""
    conn = await asyncpg.connect(settings.asyncpg_dsn, timeout=10)
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'postroom-worker' AND backend_xid IS NOT NULL"
            )
        )
    finally:
        await conn.close()


async def _status(port: int, path: str, expected: int) -> bool:
    try:
        status, _, _ = await http_get(port, path, timeout=1)
    except OSError:
        return False
    return status == expected


async def _all_applied(sessions, app) -> bool:
    n = await count(
        sessions,
        app,
        "SELECT count(DISTINCT event_id) FROM \"{s}\".effects WHERE consumer = 'billing.charge'",
    )
    return n == 40
