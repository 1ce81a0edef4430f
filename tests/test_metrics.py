"""Metrics: own registry, conventional names, bounded labels, and numbers that move."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from postroom import Event, Outbox
from postroom.backlog import read_state
from postroom.metrics import Metrics
from tests.helpers import bind_queue, collect, served_relay, wait_exit


class Sampled(Event, topic="metrics.sampled"):
    n: int


class Unheard(Event, topic="metrics.unheard"):
    n: int


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


EXPECTED_FAMILIES = {
    "postroom_outbox_pending_messages": "gauge",
    "postroom_outbox_oldest_pending_age_seconds": "gauge",
    "postroom_outbox_errored_messages": "gauge",
    "postroom_outbox_last_poll_timestamp_seconds": "gauge",
    "postroom_outbox_unroutable_messages": "gauge",
    "postroom_relay_published": "counter",
    "postroom_relay_failed": "counter",
    "postroom_relay_unroutable": "counter",
    "postroom_relay_dropped": "counter",
    "postroom_relay_batch_duration_seconds": "histogram",
    "postroom_relay_batched_publish": "gauge",
    "postroom_consumer_messages": "counter",
    "postroom_handler_duration_seconds": "histogram",
    "postroom_consumer_requeued": "counter",
    "postroom_reconnects": "counter",
    "postroom_bugs": "counter",
    "postroom_delivery_latency_seconds": "histogram",
    "postroom_handlers_in_flight": "gauge",
    "postroom_queue_messages_ready": "gauge",
    "postroom_ready": "gauge",
    "postroom_connection_up": "gauge",
    "postroom_event_loop_lag_seconds": "gauge",
    "postroom_consumer_paused": "gauge",
}


def test_each_instance_owns_its_registry_with_conventional_names():
    one, other = Metrics(), Metrics()
    one.relay_batch(seconds=0.2, published_by_topic={"a.b": 3}, failed_by_topic={"a.c": 1})
    assert value(exposition(one), "postroom_relay_published_total", topic="a.b") == 3
    assert value(exposition(one), "postroom_relay_failed_total", topic="a.c") == 1
    assert value(exposition(other), "postroom_relay_published_total", topic="a.b") is None
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("postroom")]

    families = {
        family.name: family.type
        for family in text_string_to_metric_families(exposition(one))
        if not family.name.endswith("_created")
    }
    assert families == EXPECTED_FAMILIES
    text = exposition(one)
    assert value(text, "postroom_relay_batch_duration_seconds_count") == 1
    assert value(text, "postroom_relay_batch_duration_seconds_sum") == pytest.approx(0.2)
    assert value(text, "postroom_relay_batch_duration_seconds_bucket", le="0.25") == 1
    assert value(text, "postroom_relay_batch_duration_seconds_bucket", le="0.1") == 0


def test_consumer_metrics_and_closed_label_sets():
    metrics = Metrics()
    for outcome, seconds in [("acked", 0.01), ("acked", 0.03), ("dead", 0.5), ("duplicate", 0)]:
        metrics.handled(consumer="billing", topic="shop.paid", outcome=outcome, seconds=seconds)
    text = exposition(metrics)
    labels = {"consumer": "billing", "topic": "shop.paid"}
    assert value(text, "postroom_consumer_messages_total", outcome="acked", **labels) == 2
    assert value(text, "postroom_consumer_messages_total", outcome="dead", **labels) == 1
    assert value(text, "postroom_consumer_messages_total", outcome="retry", **labels) is None
    assert value(text, "postroom_handler_duration_seconds_count", consumer="billing") == 4
    assert value(text, "postroom_handler_duration_seconds_sum", consumer="billing") == (
        pytest.approx(0.54)
    )

    gauge = "postroom_handlers_in_flight"
    with metrics.inflight("billing"):
        assert value(exposition(metrics), gauge, consumer="billing") == 1
        with pytest.raises(RuntimeError), metrics.inflight("billing"):
            assert value(exposition(metrics), gauge, consumer="billing") == 2
            raise RuntimeError("handler failed")
        assert value(exposition(metrics), gauge, consumer="billing") == 1
    assert value(exposition(metrics), gauge, consumer="billing") == 0

    metrics.connected(component="worker", peer="broker", up=True)
    metrics.connected(component="worker", peer="database", up=False)
    text = exposition(metrics)
    assert value(text, "postroom_connection_up", component="worker", peer="broker") == 1
    assert value(text, "postroom_connection_up", component="worker", peer="database") == 0

    with pytest.raises(ValueError, match="unknown outcome 'ok'"):
        metrics.handled(consumer="billing", topic="shop.paid", outcome="ok", seconds=0)
    with pytest.raises(ValueError, match="unknown component"):
        metrics.connected(component="web", peer="broker", up=True)
    with pytest.raises(ValueError, match="unknown peer"):
        metrics.connected(component="worker", peer="redis", up=True)


async def test_read_state_counts_due_delayed_and_errored_rows(settings, sessions):
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        for n in range(3):
            await box.publish(session, Sampled(n=n))
        await box.publish(session, Sampled(n=9), delay=timedelta(hours=1))
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        await asyncio.sleep(0.2)
        state = await read_state(conn, settings.schema_name)
        assert (state.pending, state.errored) == (3, 0), "a delayed row is not due yet"
        assert 0.2 <= state.oldest_age_seconds < 30
        await conn.execute(
            f'UPDATE "{settings.schema_name}".outbox SET last_error = $1 '
            "WHERE id IN (SELECT min(id) FROM "
            f'"{settings.schema_name}".outbox)',
            "unroutable",
        )
        state = await read_state(conn, settings.schema_name)
        assert (state.pending, state.errored) == (3, 1)
    finally:
        await conn.close()


async def test_relay_metrics_move_as_messages_flow(settings, sessions, amqp, names, tmp_path):
    queue = await bind_queue(amqp, settings.exchange, ["metrics.sampled"], f"q.{names}")
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        for n in range(30):
            await box.publish(session, Sampled(n=n))
    outbox = f'"{settings.schema_name}".outbox'
    holder = await asyncpg.connect(settings.asyncpg_dsn)
    # Hold every row locked: the relay skips them (SKIP LOCKED), the gauges still count them.
    hold = holder.transaction()
    await hold.start()
    await holder.execute(f"SELECT id FROM {outbox} FOR UPDATE")
    released = False
    try:
        async with served_relay(
            settings, tmp_path / "relay.log", POSTROOM_METRICS_INTERVAL="0.1"
        ) as relay:

            async def scrape() -> str:
                status, body = await relay.status("/metrics")
                assert status == 200
                return body.decode()

            async def until(name: str, expected: float, **labels: str) -> str:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 15
                while True:
                    text = await scrape()
                    if value(text, name, **labels) == expected:
                        return text
                    assert loop.time() < deadline, (name, value(text, name, **labels))
                    await asyncio.sleep(0.05)

            text = await until("postroom_outbox_pending_messages", 30)
            await asyncio.sleep(0.3)
            text = await scrape()
            assert value(text, "postroom_outbox_pending_messages") == 30
            assert value(text, "postroom_outbox_oldest_pending_age_seconds") >= 0.3
            assert value(text, "postroom_outbox_last_poll_timestamp_seconds") > 0
            assert value(text, "postroom_relay_published_total", topic="metrics.sampled") is None
            for peer in ("database", "broker"):
                assert value(text, "postroom_connection_up", component="relay", peer=peer) == 1

            await hold.rollback()
            released = True
            text = await until("postroom_relay_published_total", 30, topic="metrics.sampled")
            text = await until("postroom_outbox_pending_messages", 0)
            assert value(text, "postroom_outbox_oldest_pending_age_seconds") == 0
            assert value(text, "postroom_outbox_errored_messages") == 0
            assert value(text, "postroom_relay_batch_duration_seconds_count") >= 1
            got = await collect(settings.amqp_url.get_secret_value(), queue, count=30, settle=0.3)
            assert len(got) == 30

            # A message no queue is bound for: refused, counted, kept with its error.
            async with sessions() as session, session.begin():
                await box.publish(session, Unheard(n=1))
            text = await until("postroom_outbox_errored_messages", 1)
            text = await until("postroom_outbox_unroutable_messages", 1)
            assert value(text, "postroom_relay_failed_total", topic="metrics.unheard") >= 1
            assert value(text, "postroom_relay_unroutable_total", topic="metrics.unheard") >= 1
            # Pushed back past now, the row is not due; it still counts as lag.
            assert value(text, "postroom_outbox_pending_messages") == 0
            assert value(text, "postroom_outbox_oldest_pending_age_seconds") > 0
            assert value(text, "postroom_relay_published_total", topic="metrics.sampled") == 30
            assert value(text, "postroom_relay_published_total", topic="metrics.unheard") is None

            relay.process.terminate()
            assert await wait_exit(relay.process, timeout=10) == 0, relay.log()
    finally:
        if not released:
            await hold.rollback()
        await holder.close()


def test_delivery_latency_keeps_retries_and_replays_apart_and_counts_commits_only():
    from datetime import UTC, datetime

    from postroom.failures import Outcome, Result

    metrics = Metrics()
    latency = metrics.latency({"billing": ("shop.paid",)})
    now = datetime.now(UTC)
    hour_ago = now - timedelta(hours=1)

    def result(outcome: Outcome, *, attempt: int = 1, replayed: bool = False, at=now) -> Result:
        return Result(outcome, "id", "shop.paid", attempt, occurred_at=at, replayed=replayed)

    latency.observe("billing", result(Outcome.ACKED))
    latency.observe("billing", result(Outcome.ACKED, attempt=3, at=hour_ago))
    latency.observe("billing", result(Outcome.ACKED, replayed=True, at=hour_ago))
    for skipped in (Outcome.DUPLICATE, Outcome.RETRY, Outcome.DEAD):
        latency.observe("billing", result(skipped))
    text = exposition(metrics)
    name = "postroom_delivery_latency_seconds"
    for delivery in ("first", "retry", "replay"):
        assert value(text, f"{name}_count", consumer="billing", delivery=delivery) == 1
    assert value(text, f"{name}_bucket", consumer="billing", delivery="first", le="1.0") == 1
    assert value(text, f"{name}_bucket", consumer="billing", delivery="retry", le="1800.0") == 0
    # Outcome counters exist at zero before anything happened: a first dead letter is an
    # increase Prometheus can see.
    labels = {"consumer": "billing", "topic": "shop.paid"}
    assert value(text, "postroom_consumer_messages_total", outcome="dead", **labels) == 0


async def test_failed_rows_count_as_lag_and_unroutable_ones_are_counted(settings, sessions):
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        await box.publish(session, Sampled(n=1))
    outbox = f'"{settings.schema_name}".outbox'
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        # What the relay does with a returned message: error kept, pushed back past now.
        await conn.execute(
            f"UPDATE {outbox} SET last_error = 'unroutable (no queue bound): 312 NO_ROUTE', "
            "available_at = now() + interval '5 minutes', created_at = now() - interval '90 s'"
        )
        state = await read_state(conn, settings.schema_name)
        assert (state.pending, state.errored, state.unroutable) == (0, 1, 1)
        assert 90 <= state.oldest_age_seconds < 120, "a failed row is lag, not an empty outbox"
        await conn.execute(f"UPDATE {outbox} SET last_error = 'nacked by the broker'")
        state = await read_state(conn, settings.schema_name)
        assert (state.errored, state.unroutable) == (1, 0)
    finally:
        await conn.close()


async def test_queue_watch_counts_ready_messages_and_skips_missing_queues(settings, amqp, names):
    import aio_pika

    from postroom import queues

    queue = await bind_queue(amqp, settings.exchange, ["metrics.sampled"], f"q.{names}")
    channel = await amqp.channel()
    for _ in range(3):
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue)
    metrics = Metrics()
    stop = asyncio.Event()
    fast = settings.model_copy(update={"metrics_interval": 0.1})
    watching = asyncio.create_task(queues.watch(fast, [queue, f"missing.{names}"], metrics, stop))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while value(exposition(metrics), "postroom_queue_messages_ready", consumer=queue) != 3:
            assert loop.time() < deadline, exposition(metrics)
            assert not watching.done(), watching
            await asyncio.sleep(0.05)
        missing = value(exposition(metrics), "postroom_queue_messages_ready",
                        consumer=f"missing.{names}")  # fmt: skip
        assert missing is None, "a queue that does not exist is not reported"
    finally:
        stop.set()
        await asyncio.wait_for(watching, 10)
        await channel.close()


async def test_a_relay_blocked_by_a_broker_alarm_shows_as_lag_growing(
    settings, sessions, names, tmp_path
):
    """Up, connected, and delivering nothing: the lag must say so, not look healthy."""
    import aio_pika
    from pydantic import SecretStr

    from tests.faults import servers

    rabbit = servers.PrivateRabbit()
    try:
        await rabbit.start()
        url = await rabbit.add_vhost(f"postroom-alarm-{names}")
        private = settings.model_copy(update={"amqp_url": SecretStr(url)})
        connection = await aio_pika.connect(url)
        try:
            await bind_queue(connection, private.exchange, ["metrics.sampled"], f"q.{names}")
        finally:
            await connection.close()
        box = Outbox.from_settings(private)
        async with served_relay(
            private, tmp_path / "relay.log", POSTROOM_METRICS_INTERVAL="0.2"
        ) as relay:

            async def until(check, what: str) -> str:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while True:
                    status, body = await relay.status("/metrics")
                    text = body.decode()
                    if status == 200 and check(text):
                        return text
                    assert loop.time() < deadline, f"{what}\n{text[-1500:]}\n{relay.log()}"
                    await asyncio.sleep(0.1)

            def lag(text: str) -> float:
                return value(text, "postroom_outbox_oldest_pending_age_seconds") or 0.0

            def connected(text: str) -> bool:
                return value(text, "postroom_connection_up", component="relay", peer="broker") == 1

            await until(connected, "the relay connects")
            async with rabbit.memory_alarm():
                async with sessions() as session, session.begin():
                    for n in range(5):
                        await box.publish(session, Sampled(n=n))
                text = await until(lambda t: lag(t) > 0.5, "lag shows")
                first = lag(text)
                text = await until(lambda t: lag(t) >= first + 1.5, "lag grows")
                assert value(text, "postroom_outbox_pending_messages") == 5
                assert connected(text), "the relay is up: only the lag tells"
                published = "postroom_relay_published_total"
                assert value(text, published, topic="metrics.sampled") is None
            text = await until(lambda t: lag(t) == 0, "the backlog drains after the alarm")
            assert value(text, "postroom_outbox_pending_messages") == 0
    finally:
        await rabbit.destroy()
