"""The health server: probes and metrics over real HTTP, and the relay process behind it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from postroom import Event, Outbox
from postroom.health import HealthServer
from postroom.metrics import Metrics
from postroom.service import DRAINING, serving
from tests.faults.proxy import FaultProxy
from tests.helpers import bind_queue, http_get, served_relay, wait_exit


class Tick(Event, topic="health.tick"):
    n: int


def _through(url: str, proxy: FaultProxy) -> str:
    """*url* with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{proxy.host}:{proxy.port}" if userinfo else f"{proxy.host}:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_routes_methods_and_malformed_requests():
    reason: dict[str, str | None] = {"value": "warming up"}
    server = HealthServer(
        host="127.0.0.1", port=0, ready=lambda: reason["value"], metrics=Metrics(), read_timeout=0.5
    )
    await server.start()
    try:
        port = server.port
        assert port > 0
        taken = HealthServer(host="127.0.0.1", port=port, ready=lambda: None, metrics=Metrics())
        with pytest.raises(OSError):
            await taken.start()

        status, headers, body = await http_get(port, "/livez")
        assert (status, json.loads(body)) == (200, {"status": "alive"})
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"

        status, _, body = await http_get(port, "/readyz")
        assert (status, json.loads(body)) == (503, {"status": "unready", "reason": "warming up"})
        reason["value"] = None
        status, _, body = await http_get(port, "/readyz?verbose=1")
        assert (status, json.loads(body)) == (200, {"status": "ready"})

        status, headers, body = await http_get(port, "/livez", method="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0

        status, headers, _ = await http_get(port, "/readyz", method="POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        status, _, _ = await http_get(port, "/admin")
        assert status == 404

        status, headers, body = await http_get(port, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert b"# TYPE postroom_event_loop_lag_seconds gauge" in body

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"garbage\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 2)).startswith(b"HTTP/1.1 400 ")
        writer.close()

        # A client that never finishes its request is dropped after the read timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert time.monotonic() - started < 2
        writer.close()
    finally:
        await server.close()


async def test_readyz_reports_a_failing_check_and_livez_a_stale_heartbeat():
    now = [1000.0]

    def broken() -> str | None:
        raise RuntimeError("boom")

    # The heartbeat beats once a minute here, so the fake clock alone decides its age.
    server = HealthServer(
        host="127.0.0.1",
        port=0,
        ready=broken,
        metrics=Metrics(),
        heartbeat_interval=60,
        stale_after=10,
        clock=lambda: now[0],
    )
    await server.start()
    try:
        status, _, body = await http_get(server.port, "/readyz")
        assert status == 503 and "RuntimeError" in json.loads(body)["reason"]
        now[0] += 9
        assert (await http_get(server.port, "/livez"))[0] == 200
        now[0] += 2
        status, _, body = await http_get(server.port, "/livez")
        assert (status, json.loads(body)) == (
            503,
            {"status": "stalled", "reason": "no heartbeat for 11.0s"},
        )
    finally:
        await server.close()


async def test_serving_turns_unready_when_stopping_and_closes_after(settings):
    stop = asyncio.Event()
    async with serving(settings, ready=lambda: None, metrics=Metrics(), stop=stop, port=0) as srv:
        assert srv is not None
        port = srv.port
        assert (await http_get(port, "/readyz"))[0] == 200
        stop.set()
        status, _, body = await http_get(port, "/readyz")
        assert (status, json.loads(body)["reason"]) == (503, DRAINING)
        assert (await http_get(port, "/livez"))[0] == 200, "draining is not dead"
    try:
        await http_get(port, "/livez", timeout=1)
    except OSError:
        pass
    else:
        raise AssertionError("the health server still answers after the block")

    assert settings.health_port == 0
    async with serving(settings, ready=lambda: None, metrics=Metrics(), stop=stop) as off:
        assert off is None, "POSTROOM_HEALTH_PORT=0 turns the server off"


async def test_relay_readiness_follows_the_broker(settings, tmp_path):
    amqp = settings.amqp_url.get_secret_value()
    vhost = urlsplit(amqp).path.lstrip("/")
    async with (
        FaultProxy("127.0.0.1", 5672) as broker,
        served_relay(
            settings, tmp_path / "relay.log", POSTROOM_AMQP_URL=_through(amqp, broker)
        ) as relay,
    ):
        await relay.wait_status("/readyz", 200)

        broker.refuse(True)
        await broker.reset_all()
        body = await relay.wait_status("/readyz", 503, timeout=10)
        assert "not connected" in json.loads(body)["reason"]
        for _ in range(5):  # unready for as long as the broker is away; alive all along
            await asyncio.sleep(0.1)
            assert (await relay.status("/readyz"))[0] == 503
            assert (await relay.status("/livez"))[0] == 200
        broker.heal()
        await relay.wait_status("/readyz", 200, timeout=15)

        # The broker closing every connection of the vhost: the relay reconnects.
        accepted = broker.stats.accepted
        subprocess.run(
            ["rabbitmqctl", "close_all_connections", "-p", vhost, "test: health"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while broker.stats.accepted == accepted and loop.time() < deadline:
            assert (await relay.status("/livez"))[0] == 200
            await asyncio.sleep(0.05)
        assert broker.stats.accepted > accepted, "the relay never reconnected\n" + relay.log()
        await relay.wait_status("/readyz", 200, timeout=15)

        relay.process.terminate()
        assert await wait_exit(relay.process, timeout=10) == 0, relay.log()


async def test_relay_readiness_follows_the_database(settings, tmp_path):
    database = settings.database_url.get_secret_value()
    async with (
        FaultProxy("127.0.0.1", 5432) as postgres,
        served_relay(
            settings, tmp_path / "relay.log", POSTROOM_DATABASE_URL=_through(database, postgres)
        ) as relay,
    ):
        await relay.wait_status("/readyz", 200)

        postgres.refuse(True)
        await postgres.reset_all()
        await relay.wait_status("/readyz", 503, timeout=10)
        for _ in range(5):
            await asyncio.sleep(0.1)
            assert (await relay.status("/readyz"))[0] == 503
            assert (await relay.status("/livez"))[0] == 200
        _, body = await relay.status("/metrics")
        assert b'postroom_connection_up{component="relay",peer="database"} 0.0' in body

        postgres.heal()
        await relay.wait_status("/readyz", 200, timeout=15)
        _, body = await relay.status("/metrics")
        assert b'postroom_connection_up{component="relay",peer="database"} 1.0' in body

        relay.process.terminate()
        assert await wait_exit(relay.process, timeout=10) == 0, relay.log()


async def test_sigterm_mid_backlog_exits_0_promptly_and_loses_nothing(
    settings, sessions, amqp, names, tmp_path
):
    queue = await bind_queue(amqp, settings.exchange, ["health.#"], f"q.{names}")
    total = 3000
    box = Outbox.from_settings(settings)
    for start in range(0, total, 500):
        async with sessions() as session, session.begin():
            for n in range(start, start + 500):
                await box.publish(session, Tick(n=n))
    small = settings.model_copy(update={"relay_batch_size": 10})
    async with served_relay(small, tmp_path / "relay.log") as relay:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while b"postroom_relay_published_total{" not in (await relay.status("/metrics"))[1]:
            assert loop.time() < deadline, relay.log()
            await asyncio.sleep(0.02)
        relay.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert await wait_exit(relay.process, timeout=10) == 0, relay.log()
        assert time.monotonic() - started < 5

    channel = await amqp.channel()
    declared = await channel.declare_queue(queue, passive=True)
    delivered = declared.declaration_result.message_count or 0
    await channel.close()
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        left = await conn.fetchval(f'SELECT count(*) FROM "{settings.schema_name}".outbox')
    finally:
        await conn.close()
    # The relay finished the batch in hand: each row was published once or is still here.
    assert delivered + left == total, (delivered, left)
    assert left < total
