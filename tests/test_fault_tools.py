"""Tests of the fault-injection tools themselves: the TCP proxy and the history checker.

The proxy is exercised in front of the real PostgreSQL and RabbitMQ (and a local echo server
where exact byte accounting matters); the checker with hand-made and generated histories.
Neither depends on postroom's own code.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import aio_pika
import asyncpg
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.faults.history import (
    Committed,
    ConsumerHistory,
    Effect,
    HistoryReport,
    check_history,
)
from tests.faults.proxy import FaultProxy

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
AMQP_HOST = os.environ.get("TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("TEST_AMQP_PORT", "5672"))

# What a client sees when the proxy kills or refuses its connection.
PG_CONNECTION_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)


# proxy fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
async def pg_fault_proxy() -> AsyncIterator[FaultProxy]:
    async with FaultProxy(PG_HOST, PG_PORT) as proxy:
        yield proxy
    assert proxy.stats.active == 0


async def pg_connect(proxy: FaultProxy, connect_timeout: float = 3.0) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user="postgres",
        database="postgres",
        ssl=False,
        timeout=connect_timeout,
    )


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, int]]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    yield host, port
    server.close()
    await server.wait_closed()


def _proxy_tasks() -> list[asyncio.Task[Any]]:
    """Live tasks running the proxy's own coroutines (for leak checks)."""
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done()
        and getattr(t.get_coro(), "__qualname__", "").startswith(("FaultProxy.", "_Link."))
    ]


# proxy in front of PostgreSQL -----------------------------------------------------------------


async def test_pg_query_through_proxy_counts_bytes(pg_fault_proxy: FaultProxy) -> None:
    conn = await pg_connect(pg_fault_proxy)
    try:
        before = pg_fault_proxy.stats
        assert (before.accepted, before.active) == (1, 1)
        assert await conn.fetchval("SELECT 40 + 2") == 42
        after = pg_fault_proxy.stats
        assert after.bytes_up > before.bytes_up > 0
        assert after.bytes_down > before.bytes_down > 0
    finally:
        await conn.close()
    await pg_fault_proxy.wait_active(0)


async def test_pg_reset_all_breaks_live_connection(pg_fault_proxy: FaultProxy) -> None:
    conn = await pg_connect(pg_fault_proxy)
    assert await conn.fetchval("SELECT 1") == 1

    assert await pg_fault_proxy.reset_all() == 1

    with pytest.raises(PG_CONNECTION_ERRORS):
        await conn.fetchval("SELECT 1")
    assert conn.is_closed()
    assert pg_fault_proxy.stats.reset == 1
    # The proxy keeps listening: a reconnect works at once.
    again = await pg_connect(pg_fault_proxy)
    assert await again.fetchval("SELECT 2") == 2
    await again.close()


async def test_pg_refuse_fails_new_connects_until_heal(pg_fault_proxy: FaultProxy) -> None:
    live = await pg_connect(pg_fault_proxy)
    pg_fault_proxy.refuse(True)

    with pytest.raises(PG_CONNECTION_ERRORS):
        await pg_connect(pg_fault_proxy)
    assert pg_fault_proxy.stats.refused == 1
    assert await live.fetchval("SELECT 1") == 1, "refuse must not touch live connections"

    pg_fault_proxy.heal()
    conn = await pg_connect(pg_fault_proxy)
    assert await conn.fetchval("SELECT 3") == 3
    await conn.close()
    await live.close()


async def test_pg_latency_delays_round_trip(pg_fault_proxy: FaultProxy) -> None:
    conn = await pg_connect(pg_fault_proxy)
    try:
        await conn.execute("SELECT 1")  # warm up
        pg_fault_proxy.latency(0.1)
        started = time.monotonic()
        await conn.execute("SELECT 1")
        elapsed = time.monotonic() - started
        # A simple query is one request chunk up and one response chunk down.
        assert elapsed >= 0.2 * 0.95
        pg_fault_proxy.heal()
        started = time.monotonic()
        await conn.execute("SELECT 1")
        assert time.monotonic() - started < elapsed, "heal must remove the latency"
    finally:
        await conn.close()


async def test_pg_cut_after_closes_at_exact_budget(pg_fault_proxy: FaultProxy) -> None:
    conn = await pg_connect(pg_fault_proxy)
    before = pg_fault_proxy.stats
    pg_fault_proxy.cut_after(200)

    with pytest.raises(PG_CONNECTION_ERRORS):
        await conn.fetchval("SELECT repeat('x', 5000)")

    after = pg_fault_proxy.stats
    forwarded = (after.bytes_up + after.bytes_down) - (before.bytes_up + before.bytes_down)
    assert forwarded == 200, "the chunk reaching the budget is truncated to it"
    assert after.cut == 1
    await pg_fault_proxy.wait_active(0)

    # New connections get the whole budget from their start: the handshake alone exceeds it.
    with pytest.raises(PG_CONNECTION_ERRORS):
        await pg_connect(pg_fault_proxy)
    pg_fault_proxy.heal()
    conn = await pg_connect(pg_fault_proxy)
    assert await conn.fetchval("SELECT length(repeat('x', 5000))") == 5000
    await conn.close()


async def test_pg_blackhole_holds_bytes_then_heal_delivers(pg_fault_proxy: FaultProxy) -> None:
    conn = await pg_connect(pg_fault_proxy)
    try:
        pg_fault_proxy.blackhole(True)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.fetchval("SELECT 1"), 0.3)
        # New connections hang in the handshake, as behind a partition.
        with pytest.raises(TimeoutError):
            await pg_connect(pg_fault_proxy, connect_timeout=0.3)
        assert pg_fault_proxy.stats.active >= 1
    finally:
        pg_fault_proxy.heal()
        conn.terminate()

    # Bytes are held, not dropped: a query sent during the blackhole completes after heal.
    conn = await pg_connect(pg_fault_proxy)
    try:
        pg_fault_proxy.blackhole(True)
        query = asyncio.create_task(conn.fetchval("SELECT 42"))
        await asyncio.sleep(0.2)
        assert not query.done()
        pg_fault_proxy.heal()
        assert await asyncio.wait_for(query, 3) == 42
    finally:
        await conn.close()


# proxy in front of RabbitMQ -------------------------------------------------------------------


async def test_amqp_reset_all_closes_connection() -> None:
    async with FaultProxy(AMQP_HOST, AMQP_PORT) as proxy:
        connection = await aio_pika.connect(proxy.url("amqp", "guest:guest", "/"), timeout=5)
        closed: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

        def on_close(_: object, exc: BaseException | None = None) -> None:
            if not closed.done():
                closed.set_result(exc)

        connection.close_callbacks.add(on_close)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                f"postroom-fault-tools-{uuid.uuid4().hex}", auto_delete=True, exclusive=True
            )
            assert queue.declaration_result.message_count == 0
            assert proxy.stats.active == 1

            assert await proxy.reset_all() == 1

            exc = await asyncio.wait_for(closed, 5)
            assert exc is not None, "the close must be reported as an error, not a clean close"
            assert not connection.connected.is_set()
            with pytest.raises((RuntimeError, aio_pika.exceptions.AMQPError), match="closed"):
                await channel.declare_queue(queue.name, passive=True)
        finally:
            await connection.close()
    assert proxy.stats.reset == 1


# proxy mechanics (local echo server) -----------------------------------------------------------


async def test_many_concurrent_connections_forward_intact(echo_server: tuple[str, int]) -> None:
    clients, size = 40, 200_000

    async def roundtrip(proxy: FaultProxy, seed: int) -> bool:
        payload = random.Random(seed).randbytes(size)
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        echoed = await reader.read(-1)  # until EOF: needs the half-close to travel both ways
        await sender
        writer.close()
        return echoed == payload

    async with FaultProxy(*echo_server) as proxy:
        results = await asyncio.gather(*(roundtrip(proxy, i) for i in range(clients)))
        assert all(results)
        stats = proxy.stats
        assert stats.accepted == clients
        assert stats.bytes_up == stats.bytes_down == clients * size
        await proxy.wait_active(0)
    assert _proxy_tasks() == []


async def test_close_tears_down_live_connections(echo_server: tuple[str, int]) -> None:
    proxy = await FaultProxy(*echo_server).start()
    streams = [await asyncio.open_connection(proxy.host, proxy.port) for _ in range(10)]
    for reader, writer in streams:
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
    async with asyncio.timeout(2):
        await proxy.wait_active(10)

    await proxy.close()

    assert _proxy_tasks() == []
    assert proxy.stats.active == 0
    for reader, writer in streams:
        with pytest.raises(ConnectionResetError):
            await reader.read(1)  # RST, not a polite EOF
        writer.close()
    with pytest.raises(RuntimeError):
        _ = proxy.port


async def test_cut_after_zero_and_upstream_down(echo_server: tuple[str, int]) -> None:
    async with FaultProxy(*echo_server) as proxy:
        proxy.cut_after(0)
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"hello")
        assert await reader.read(-1) == b"", "cut_after(0) forwards nothing, then FIN"
        writer.close()
        assert proxy.stats.cut == 1
        assert proxy.stats.bytes_up == 0

    with socket.socket() as probe:  # a port nobody listens on (racy but harmless)
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    async with FaultProxy("127.0.0.1", dead_port) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        with pytest.raises(ConnectionResetError):
            await reader.read(1)
        writer.close()
        assert proxy.stats.upstream_failed == 1


def test_fault_setters_validate() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(ValueError):
        proxy.latency(-1)
    with pytest.raises(ValueError):
        proxy.cut_after(-1)
    with pytest.raises(RuntimeError):
        _ = proxy.url("amqp")


# history checker: hand-made histories ----------------------------------------------------------


def base_committed() -> dict[str, Committed]:
    """Two keys of three messages, two unkeyed messages, one poison message."""
    return {
        "a1": Committed("A", 1),
        "a2": Committed("A", 2),
        "a3": Committed("A", 3),
        "b1": Committed("B", 1),
        "b2": Committed("B", 2),
        "b3": Committed("B", 3, poison=True),
        "u1": Committed(None, 5),
        "u2": Committed(None, 1),
    }


def clean_effects() -> list[Effect]:
    c = base_committed()
    order = ["b1", "a1", "u2", "a2", "b2", "u1", "a3"]  # interleaved, per-key ordered
    return [Effect(m, c[m].key, c[m].seq) for m in order]


def clean(name: str = "c", **changes: Any) -> ConsumerHistory:
    history = ConsumerHistory(name, clean_effects(), ["b3"], ordered=True)
    return replace(history, **changes)


def check(*consumers: ConsumerHistory, **kwargs: Any) -> HistoryReport:
    return check_history(base_committed(), kwargs.pop("rolled_back", ["r1"]), consumers, **kwargs)


def test_clean_history_is_ok_and_prints() -> None:
    report = check(clean("ordered"), clean("unordered", ordered=False))
    assert report.ok
    assert report.committed == 8
    assert report.rolled_back == 1
    c = report.consumer("ordered")
    assert (c.expected, c.applied, c.dead) == (8, 7, 1)
    assert report.total.applied == 14
    assert report.total.delivered_twice is None
    table = report.table()
    lines = table.splitlines()
    assert "-> OK" in lines[0]
    rows = [line.split()[0] for line in lines[1:] if not line.startswith("-")]
    assert rows == ["consumer", "ordered", "unordered", "TOTAL"]
    assert "FAIL" not in table
    assert str(report) == table


# (label, consumer history, anomaly field, expected count)
ANOMALIES: list[tuple[str, Callable[[], ConsumerHistory], str, int]] = [
    ("lost", lambda: clean(effects=clean_effects()[1:]), "lost", 1),
    (
        "phantom: rolled back applied",
        lambda: clean(effects=[*clean_effects(), Effect("r1", None, 0)]),
        "phantom",
        1,
    ),
    ("phantom: never committed dead", lambda: clean(dead_letters=["b3", "zz"]), "phantom", 1),
    (
        "applied twice",
        lambda: clean(effects=[*clean_effects(), Effect("a3", "A", 3)]),
        "applied_twice",
        1,
    ),
    ("dead twice", lambda: clean(dead_letters=["b3", "b3"]), "dead_twice", 1),
    (
        "unexpected dead letter",
        lambda: clean(effects=clean_effects()[:-1], dead_letters=["b3", "a3"]),
        "unexpected_dead",
        1,
    ),
    ("poison lost", lambda: clean(dead_letters=[]), "poison_missed", 1),
    (
        "poison applied",
        lambda: clean(effects=[*clean_effects(), Effect("b3", "B", 3)], dead_letters=[]),
        "poison_missed",
        1,
    ),
    (
        "applied and dead",
        lambda: clean(effects=[*clean_effects(), Effect("b3", "B", 3)]),
        "applied_and_dead",
        1,
    ),
    (
        "mismatched payload",
        lambda: clean(effects=[*clean_effects()[:-1], Effect("a3", "A", 30)]),
        "mismatched",
        1,
    ),
    (
        "misrouted",
        lambda: clean(expected=["a1", "a2", "a3", "b1", "b2", "b3", "u1"]),
        "misrouted",
        1,
    ),
    (
        "order: retry applied after a later seq",
        lambda: clean(
            effects=[e for e in clean_effects() if e.message_id != "a1"] + [Effect("a1", "A", 1)]
        ),
        "order_violations",
        1,
    ),
]


@pytest.mark.parametrize(
    ("history", "anomaly", "count"),
    [pytest.param(h, a, n, id=label) for label, h, a, n in ANOMALIES],
)
def test_each_anomaly_is_detected_alone(
    history: Callable[[], ConsumerHistory], anomaly: str, count: int
) -> None:
    report = check(history(), clean("healthy"))
    bad, good = report.consumer("c"), report.consumer("healthy")
    assert getattr(bad, anomaly) == count
    assert not bad.ok
    assert not report.ok
    assert good.ok
    assert getattr(report.total, anomaly) == count
    assert bad.examples[anomaly], "offenders are named for the failure message"
    others = {"lost", "phantom", "applied_twice", "dead_twice", "unexpected_dead"}
    others |= {"poison_missed", "applied_and_dead", "mismatched", "misrouted"}
    others |= {"order_violations"}
    for other in others - {anomaly}:
        if (anomaly, other) == ("poison_missed", "lost") and bad.lost:
            continue  # a poison message that vanished is both lost and not dead-lettered
        assert getattr(bad, other) == 0, other
    row = next(line for line in report.table().splitlines() if line.startswith("c "))
    assert row.endswith("FAIL")


def test_order_is_checked_only_for_ordered_consumers_and_keyed_messages() -> None:
    reversed_a = [e for e in reversed(clean_effects())]
    assert check(clean(effects=reversed_a)).consumer("c").order_violations == 3
    assert check(clean(effects=reversed_a, ordered=False)).ok
    c = base_committed()
    unkeyed_descending = ["u1", "b1", "a1", "a2", "b2", "a3", "u2"]  # u1 has the higher seq
    effects = [Effect(m, c[m].key, c[m].seq) for m in unkeyed_descending]
    assert check(clean(effects=effects, ordered=True)).ok


def test_delivered_twice_is_counted_but_allowed() -> None:
    deliveries = Counter(["a1", "a1", "a2", "b3", "b3", "b3"])
    report = check(clean(deliveries=deliveries), clean("other"))
    assert report.ok
    assert report.consumer("c").delivered_twice == 2
    assert report.consumer("other").delivered_twice is None
    assert report.total.delivered_twice == 2


def test_indeterminate_commits_resolve_by_observation() -> None:
    unsure = {"x1": Committed("A", 4), "x2": Committed(None, 0)}
    seen_by_one = [*clean_effects(), Effect("x1", "A", 4)]
    report = check(clean("saw", effects=seen_by_one), clean("missed"), indeterminate=unsure)
    assert report.indeterminate == 2
    assert report.indeterminate_committed == 1
    assert report.committed == 9
    assert report.consumer("saw").ok, "x2 was never seen: it may have rolled back"
    assert report.consumer("missed").lost == 1, "x1 did commit, so every consumer owes it"


def test_ids_compare_by_text_across_types() -> None:
    mid = uuid.uuid4()
    report = check_history(
        {str(mid): ("K", 1, False), "7": (None, 0, False)},  # as recorded by a producer
        [],
        [ConsumerHistory("c", [(mid, "K", 1), (7, None, 0)], deliveries={mid: 2})],  # as read
    )
    assert report.ok
    assert report.consumer("c").applied == 2
    assert report.consumer("c").delivered_twice == 1


def test_contradictory_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="more than one"):
        check_history({"m": (None, 0, False)}, ["m"], [])
    with pytest.raises(ValueError, match="duplicate consumer"):
        check_history({}, [], [ConsumerHistory("c", []), ConsumerHistory("c", [])])


# history checker: generated histories ----------------------------------------------------------


@st.composite
def clean_histories(draw: st.DrawFn) -> tuple[dict[str, Committed], list[str], ConsumerHistory]:
    """A random correct run: keyed and unkeyed messages, poison, rollbacks, interleavings."""
    n = draw(st.integers(1, 40))
    keys = draw(st.lists(st.sampled_from(["k1", "k2", "k3", None]), min_size=n, max_size=n))
    poison = draw(st.lists(st.sampled_from([False] * 4 + [True]), min_size=n, max_size=n))
    next_seq: Counter[str | None] = Counter()
    committed: dict[str, Committed] = {}
    for i, (key, bad) in enumerate(zip(keys, poison, strict=True)):
        next_seq[key] += 1
        committed[f"m{i}"] = Committed(key, next_seq[key], bad)
    rolled_back = [f"r{i}" for i in range(draw(st.integers(0, 5)))]
    # A random interleaving that keeps each key's order: shuffle the slots, then put every
    # key's messages back into the slots that key got, in seq order.
    applied = [m for m, c in committed.items() if not c.poison]
    slots = draw(st.permutations(applied))
    by_key: dict[str | None, list[str]] = {}
    for m in applied:
        by_key.setdefault(committed[m].key, []).append(m)
    queues = {k: iter(v) for k, v in by_key.items()}
    order = [next(queues[committed[m].key]) for m in slots]
    effects = [Effect(m, committed[m].key, committed[m].seq) for m in order]
    dead = [m for m, c in committed.items() if c.poison]
    deliveries = {m: draw(st.integers(1, 3)) for m in committed}
    history = ConsumerHistory("gen", effects, dead, ordered=True, deliveries=deliveries)
    return committed, rolled_back, history


@settings(deadline=None)
@given(clean_histories())
def test_generated_clean_history_is_ok(
    case: tuple[dict[str, Committed], list[str], ConsumerHistory],
) -> None:
    committed, rolled_back, history = case
    report = check_history(committed, rolled_back, [history])
    assert report.ok, report.table()
    c = report.consumer("gen")
    assert c.applied + c.dead == c.expected == len(committed)
    assert c.dead == sum(x.poison for x in committed.values())


@settings(deadline=None)
@given(clean_histories(), st.data())
def test_one_injected_duplicate_is_exactly_one_applied_twice(
    case: tuple[dict[str, Committed], list[str], ConsumerHistory], data: st.DataObject
) -> None:
    committed, rolled_back, history = case
    effects = list(history.effects)
    assume(effects)
    i = data.draw(st.integers(0, len(effects) - 1))
    effects.insert(i + 1, effects[i])  # a redelivery whose handler ran again
    report = check_history(committed, rolled_back, [replace(history, effects=effects)])
    c = report.consumer("gen")
    assert c.applied_twice == 1
    assert not report.ok
    assert (c.lost, c.phantom, c.order_violations, c.mismatched) == (0, 0, 0, 0)


@settings(deadline=None)
@given(clean_histories(), st.data())
def test_one_dropped_effect_is_exactly_one_lost(
    case: tuple[dict[str, Committed], list[str], ConsumerHistory], data: st.DataObject
) -> None:
    committed, rolled_back, history = case
    effects = list(history.effects)
    assume(effects)
    dropped = effects.pop(data.draw(st.integers(0, len(effects) - 1)))
    report = check_history(committed, rolled_back, [replace(history, effects=effects)])
    c = report.consumer("gen")
    assert c.lost == 1
    assert c.examples["lost"] == (str(dropped[0]),)
    assert c.applied_twice == c.order_violations == c.phantom == 0
