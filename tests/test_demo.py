"""`postroom demo`, small, as a newcomer runs it: real subprocesses, real services.

The demo's own summary is checked, and then the shop's tables and postroom's tables are
read directly, so a summary that lied would not pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text

from examples.shop.consumers import router
from postroom.settings import Settings
from tests.conftest import ROOT, postroom_cmd, settings_env
from tests.helpers import delete_queues

pytestmark = pytest.mark.timeout(150)

CONSUMERS = ["shop.payments", "shop.shipping", "shop.notifications", "shop.analytics"]


@pytest.fixture
async def demo_settings(settings: Settings, engine, amqp):
    """The test's settings with a schema the demo migrates itself; its traces removed after."""
    demo = settings.model_copy(update={"schema_name": f"demo_{settings.schema_name}"})
    yield demo
    async with engine.begin() as conn:
        await conn.execute(text("DROP SCHEMA IF EXISTS shop CASCADE"))
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{demo.schema_name}" CASCADE'))
    await delete_queues(amqp, router)


async def run_demo(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *postroom_cmd("demo", *args),
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.terminate()  # the demo stops its relay and worker on SIGTERM
        out, err = await asyncio.wait_for(process.communicate(), 30)
        pytest.fail(f"the demo ran over {timeout} s; stderr:\n{err.decode()}")
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def rows(engine, sql: str) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql))).all())


async def per_order(engine, table: str) -> Counter[int]:
    return Counter(order for (order,) in await rows(engine, f"SELECT order_id FROM shop.{table}"))


async def test_demo_runs_the_shop_end_to_end(demo_settings: Settings, engine, amqp):
    env = settings_env(demo_settings)
    code, out, err = await run_demo(env, "--orders", "30", "--json")
    assert code == 0, err
    summary = json.loads(out)
    schema = demo_settings.schema_name

    # The summary: every check passed and the numbers are the shop's rules at 30 orders.
    assert summary["ok"] is True
    assert all(check["ok"] for check in summary["checks"]), summary["checks"]
    assert summary["orders"] == 30
    assert summary["published"] == {"shop.order-placed": 30, "shop.payment-completed": 29}
    assert summary["handled"] == dict.fromkeys(CONSUMERS, 29)
    # Orders 10, 20 and 30 time out once at the payment provider; order 25's receipt
    # meets a busy mail server twice.
    assert summary["retries"] == {
        "shop.payments": 3,
        "shop.shipping": 0,
        "shop.notifications": 2,
        "shop.analytics": 0,
    }
    assert summary["relayed"] == 30 + 29 + 5
    [letter] = summary["dead_letters"]
    assert letter == {
        "consumer": "shop.payments",
        "reason": "rejected",
        "error": "postroom.errors.Reject: card declined for order 13",
        "attempts": 1,
        "order_id": 13,
    }
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert summary["orders_per_second"] > 0
    assert f"POSTROOM_SCHEMA={schema}" in summary["dead_letters_command"]
    assert summary["dead_letters_command"].endswith("dead-letters list")

    # The tables themselves: each effect exactly once per order.
    orders = [order for (order,) in await rows(engine, "SELECT id FROM shop.orders ORDER BY id")]
    assert orders == list(range(1, 31))
    paid = [order for order in orders if order != 13]
    assert await per_order(engine, "payments") == Counter(paid)
    assert await per_order(engine, "shipments") == Counter(paid)
    assert await per_order(engine, "notifications") == Counter(paid)
    attempts = dict(await rows(engine, "SELECT order_id, attempt FROM shop.payments"))
    assert {order for order, attempt in attempts.items() if attempt == 2} == {10, 20, 30}
    assert set(attempts.values()) == {1, 2}
    assert dict(await rows(engine, "SELECT order_id, attempt FROM shop.notifications"))[25] == 3
    counters = dict(await rows(engine, "SELECT name, value FROM shop.analytics_counters"))
    [(revenue,)] = await rows(engine, "SELECT sum(total_cents) FROM shop.orders WHERE id <> 13")
    assert counters == {"orders_paid": 29, "revenue_cents": revenue, "handler_attempts": 29}

    # postroom's own tables agree: the inbox, the dead letter with its reason, an empty outbox.
    inbox = dict(await rows(engine, f'SELECT consumer, count(*) FROM "{schema}".inbox GROUP BY 1'))
    assert inbox == dict.fromkeys(CONSUMERS, 29)
    [dead] = await rows(
        engine, f'SELECT consumer, reason, error_message, attempts FROM "{schema}".dead_letters'
    )
    assert tuple(dead) == ("shop.payments", "rejected", "card declined for order 13", 1)
    assert await rows(engine, f'SELECT count(*) FROM "{schema}".outbox') == [(0,)]

    # The relay and the worker were stopped: nobody consumes the shop's queues any more.
    channel = await amqp.channel()
    for name in CONSUMERS:
        queue = await channel.declare_queue(name, passive=True)
        assert queue.declaration_result.consumer_count == 0, name
        assert queue.declaration_result.message_count == 0, name
    await channel.close()

    # A second run starts clean: nothing of the first run is counted again.
    code, out, err = await run_demo(env, "--orders", "12", "--json")
    assert code == 0, err
    again = json.loads(out)
    assert again["ok"] is True
    assert again["orders"] == 12
    assert again["dead_letters"] == []  # order 13 was not placed this time
    assert again["handled"] == dict.fromkeys(CONSUMERS, 12)
    assert await rows(engine, "SELECT count(*) FROM shop.orders") == [(12,)]
    assert await rows(engine, f'SELECT count(*) FROM "{schema}".dead_letters') == [(0,)]


async def test_demo_says_which_service_is_down_and_how_to_start_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env["POSTROOM_DATABASE_URL"] = "postgresql+asyncpg://postgres:pg-s3cret@127.0.0.1:9/shop"
    env["POSTROOM_AMQP_URL"] = "amqp://guest:mq-s3cret@127.0.0.1:9/"
    started = time.monotonic()
    code, out, err = await run_demo(env, "--orders", "5", timeout=30)
    assert time.monotonic() - started < 20
    assert code == 1
    assert out == ""
    assert (
        "PostgreSQL is not reachable at postgresql+asyncpg://postgres:***@127.0.0.1:9/shop" in err
    )
    assert "RabbitMQ is not reachable at amqp://guest:***@127.0.0.1:9/" in err
    assert "pg_ctlcluster --skip-systemctl-redirect" in err
    assert "rabbitmq-server -detached" in err
    assert "docker compose -f deploy/compose.yaml up -d" in err
    assert "s3cret" not in err


async def test_demo_tells_a_refused_login_from_a_service_that_is_down(database_url, amqp_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env["POSTROOM_DATABASE_URL"] = database_url
    env["POSTROOM_AMQP_URL"] = amqp_url.replace("guest:guest@", "guest:wrong-pw@")
    code, _, err = await run_demo(env, "--orders", "5", timeout=30)
    assert code == 1
    assert "RabbitMQ at amqp://guest:***@" in err
    assert "answered but refused the connection" in err
    assert "POSTROOM_AMQP_URL" in err
    assert "wrong-pw" not in err
    assert "PostgreSQL" not in err  # the database answered
