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
    "postroom_handlers_in_flight": "gauge",
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
            assert value(text, "postroom_relay_failed_total", topic="metrics.unheard") >= 1
            assert value(text, "postroom_relay_unroutable_total", topic="metrics.unheard") >= 1
            assert value(text, "postroom_relay_published_total", topic="metrics.sampled") == 30
            assert value(text, "postroom_relay_published_total", topic="metrics.unheard") is None

            relay.process.terminate()
            assert await wait_exit(relay.process, timeout=10) == 0, relay.log()
    finally:
        if not released:
            await hold.rollback()
        await holder.close()
