"""The relay against real PostgreSQL and RabbitMQ: delivery, faults, replicas, order."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import defaultdict

import asyncpg
from sqlalchemy import select, text

from postroom import Event, Outbox
from postroom.faults import RELAY_AFTER_CONFIRM
from postroom.settings import Settings
from postroom.tables import outbox, schema_map
from tests.helpers import (
    bind_queue,
    collect,
    eventually,
    logs_of,
    running_relay,
    spawn,
    wait_exit,
)


class OrderPlaced(Event, topic="shop.order-placed"):
    order_id: int
    total_cents: int


class Stepped(Event, topic="seq.stepped"):
    key: str
    seq: int


async def publish_many(
    sessions,
    settings: Settings,
    n: int,
    *,
    per_tx: int = 50,
    keys: int = 0,
    prefix: str = "k",
    start: int = 0,
) -> None:
    box = Outbox.from_settings(settings)
    i = start
    n += start
    while i < n:
        async with sessions() as session, session.begin():
            for _ in range(min(per_tx, n - i)):
                if keys:
                    key = f"{prefix}{i % keys}"
                    await box.publish(session, Stepped(key=key, seq=i), key=key)
                else:
                    await box.publish(session, OrderPlaced(order_id=i, total_cents=i))
                i += 1


async def pending(sessions, settings: Settings) -> list:
    async with sessions() as session:
        result = await session.execute(
            select(outbox),
            execution_options={"schema_translate_map": schema_map(settings.schema_name)},
        )
        return list(result.all())


async def test_committed_event_arrives_once_with_properties_and_headers(
    settings, sessions, amqp, names
):
    queue = await bind_queue(amqp, settings.exchange, ["shop.#"], f"q.{names}")
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        message = await box.publish(
            session,
            OrderPlaced(order_id=7, total_cents=990),
            key="order-7",
            headers={"tenant": "acme"},
        )
    async with running_relay(settings):
        got = await collect(settings.amqp_url.get_secret_value(), queue, count=1, settle=0.5)
    assert len(got) == 1
    received = got[0]
    assert received.json() == {"order_id": 7, "total_cents": 990}
    assert received.message_id == str(message.message_id)
    assert received.type == "shop.order-placed"
    assert received.content_type == "application/json"
    assert received.correlation_id == str(message.message_id)
    headers = received.headers
    assert headers["cloudEvents_id"] == str(message.message_id)
    assert headers["cloudEvents_type"] == "shop.order-placed"
    assert headers["cloudEvents_specversion"] == "1.0"
    assert headers["postroom-key"] == "order-7"
    assert headers["postroom-attempt"] == 1
    assert headers["tenant"] == "acme"
    assert headers["traceparent"] == message.traceparent
    # Only the broker's own bookkeeping header may start with x-.
    assert {k for k in headers if k.startswith("x-")} <= {"x-delivery-count"}
    assert await pending(sessions, settings) == []


async def test_rolled_back_event_is_never_published(settings, sessions, amqp, names):
    queue = await bind_queue(amqp, settings.exchange, ["shop.#"], f"q.{names}")
    box = Outbox.from_settings(settings)
    async with running_relay(settings):
        async with sessions() as session:
            await session.begin()
            await box.publish(session, OrderPlaced(order_id=1, total_cents=1))
            await session.rollback()
        async with sessions() as session, session.begin():
            await box.publish(session, OrderPlaced(order_id=2, total_cents=2))
        got = await collect(settings.amqp_url.get_secret_value(), queue, count=1, settle=1.0)
    assert [m.json()["order_id"] for m in got] == [2]


async def test_relay_killed_mid_batch_loses_nothing(settings, sessions, amqp, names, database_url):
    queue = await bind_queue(amqp, settings.exchange, ["shop.#"], f"q.{names}")
    await publish_many(sessions, settings, 300)
    # Crash exactly after the broker confirmed a batch, before the rows were deleted.
    crashing = spawn(settings, "relay", POSTROOM_CRASH_AT=RELAY_AFTER_CONFIRM)
    assert await wait_exit(crashing) == -signal.SIGKILL
    assert len(await pending(sessions, settings)) == 300  # the claim rolled back
    # And once more mid-run, at a moment a batch is in flight: freeze the relay, look
    # whether its claim transaction holds rows, SIGKILL it if so, else thaw and retry.
    small = settings.model_copy(update={"relay_batch_size": 5})
    relay = spawn(small, "relay")
    admin = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await eventually(lambda: _rows_left(sessions, settings, below=300), timeout=30)
        for _ in range(200):
            relay.send_signal(signal.SIGSTOP)
            in_flight = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'postroom-relay' AND backend_xid IS NOT NULL"
            )
            if in_flight:
                relay.send_signal(signal.SIGKILL)
                break
            relay.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.005)
    finally:
        await admin.close()
    assert in_flight, "never caught the relay holding a claimed batch"
    assert await wait_exit(relay) == -signal.SIGKILL
    left = len(await pending(sessions, settings))
    assert 0 < left < 300, f"killed mid-run with {left} rows left"
    restarted = spawn(settings, "relay")
    try:
        got = await collect(settings.amqp_url.get_secret_value(), queue, count=300, timeout=60)
        for _ in range(100):
            if not await pending(sessions, settings):
                break
            await asyncio.sleep(0.1)
    finally:
        restarted.terminate()
        assert await wait_exit(restarted) == 0
    ids = {m.json()["order_id"] for m in got}
    assert ids == set(range(300)), "every committed row arrives at least once"
    assert await pending(sessions, settings) == []


async def _rows_left(sessions, settings: Settings, *, below: int) -> bool:
    return len(await pending(sessions, settings)) < below


async def test_relay_recovers_from_broker_and_database_connection_kills(
    settings, sessions, amqp, names, database_url
):
    queue = await bind_queue(amqp, settings.exchange, ["shop.#"], f"q.{names}")
    vhost = settings.amqp_url.get_secret_value().rsplit("/", 1)[1]
    admin_dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    relay = spawn(settings, "relay")
    try:
        await publish_many(sessions, settings, 100)
        await collect(settings.amqp_url.get_secret_value(), queue, count=100)
        subprocess.run(
            ["rabbitmqctl", "close_all_connections", "-p", vhost, "test: broker kill"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        await publish_many(sessions, settings, 100, start=100)
        conn = await asyncpg.connect(admin_dsn)
        try:
            # Wait for the relay to be back on the database, then kill its backend.
            killed = 0
            for _ in range(200):
                killed = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'postroom-relay'"
                )
                if killed:
                    break
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
        assert killed >= 1, f"the relay never reconnected to the database:\n{logs_of(relay)}"
        await publish_many(sessions, settings, 100, start=200)
        try:
            got = await collect(settings.amqp_url.get_secret_value(), queue, count=200, timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; relay log:\n{logs_of(relay)}") from None
        assert relay.poll() is None, f"the relay died:\n{logs_of(relay)}"
    finally:
        relay.terminate()
        assert await wait_exit(relay) == 0
    ids = {m.json()["order_id"] for m in got}
    assert ids == set(range(100, 300)), "nothing published after the kills was lost"
    assert await pending(sessions, settings) == []


async def test_two_relays_publish_everything_in_key_order(settings, sessions, amqp, names):
    queue = await bind_queue(amqp, settings.exchange, ["seq.#"], f"q.{names}")
    small = settings.model_copy(update={"relay_batch_size": 20})
    relays = [spawn(small, "relay"), spawn(small, "relay")]
    try:
        writers = [
            publish_many(sessions, settings, 400, per_tx=5, keys=7, prefix=p) for p in ("a", "b")
        ]
        await asyncio.gather(*writers)
        got = await collect(settings.amqp_url.get_secret_value(), queue, count=800, timeout=60)
    finally:
        for relay in relays:
            relay.terminate()
        for relay in relays:
            assert await wait_exit(relay) == 0
    by_key: dict[str, list[int]] = defaultdict(list)
    for m in got:
        body = m.json()
        by_key[body["key"]].append(body["seq"])
    assert sum(len(v) for v in by_key.values()) == 800
    assert len(by_key) == 14
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), f"order broken for key {key}: {seqs}"


async def test_commits_out_of_id_order_are_not_skipped(settings, sessions, amqp, names):
    queue = await bind_queue(amqp, settings.exchange, ["shop.#"], f"q.{names}")
    box = Outbox.from_settings(settings)
    async with running_relay(settings):
        early = sessions()
        await early.begin()
        await box.publish(early, OrderPlaced(order_id=1, total_cents=1))  # lower id, commits last
        async with sessions() as session, session.begin():
            await box.publish(session, OrderPlaced(order_id=2, total_cents=2))
        first = await collect(settings.amqp_url.get_secret_value(), queue, count=1)
        await early.commit()
        await early.close()
        second = await collect(settings.amqp_url.get_secret_value(), queue, count=1)
    assert [m.json()["order_id"] for m in first + second] == [2, 1]


async def test_unroutable_row_stays_with_its_error(settings, sessions):
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        await box.publish(session, OrderPlaced(order_id=1, total_cents=1))  # no queue bound
    async with running_relay(settings) as relay:
        for _ in range(100):
            rows = await pending(sessions, settings)
            if rows and rows[0].attempts >= 1:
                break
            await asyncio.sleep(0.05)
        assert relay.stats.published == 0 and relay.stats.failed >= 1
    [row] = await pending(sessions, settings)
    assert row.attempts >= 1
    assert "unroutable" in row.last_error and "NO_ROUTE" in row.last_error
    async with sessions() as session:
        delay = await session.scalar(
            text(f'SELECT available_at > now() FROM "{settings.schema_name}".outbox')
        )
    assert delay, "a failed row is rescheduled, not retried in a hot loop"


async def test_a_row_locked_by_another_transaction_holds_back_its_key(
    settings, sessions, amqp, names, database_url
):
    """Found by the fault suite's `outbox_lock`: SKIP LOCKED passed over a key's locked
    head row and published the rows after it, out of key order."""
    queue = await bind_queue(amqp, settings.exchange, ["seq.#"], f"q.{names}")
    await publish_many(sessions, settings, 4, per_tx=4, keys=1, prefix="held")  # seq 0..3
    await publish_many(sessions, settings, 1, keys=1, prefix="free", start=4)
    admin = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        lock = admin.transaction()
        await lock.start()
        locked = await admin.fetchval(
            f'SELECT id FROM "{settings.schema_name}".outbox WHERE ordering_key = $1 '
            "ORDER BY id LIMIT 1 FOR UPDATE",
            "held0",
        )
        assert locked is not None
        async with running_relay(settings) as relay:
            # A batch ran while the head was locked: the later row of another key came out
            # first, and nothing of the held key came before or with it.
            first = await collect(settings.amqp_url.get_secret_value(), queue, count=1)
            assert [m.json()["key"] for m in first] == ["free0"]
            await eventually(lambda: relay.stats.batches >= 1)  # settled after its commit
            assert relay.stats.published == 1
            await lock.rollback()
            rest = await collect(settings.amqp_url.get_secret_value(), queue, count=4)
    finally:
        await admin.close()
    assert [(m.json()["key"], m.json()["seq"]) for m in rest] == [("held0", s) for s in range(4)]
