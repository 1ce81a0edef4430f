"""Lanes: a worker's kept connections, on which postroom drives each message's transaction.

What must hold now that a connection outlives its message (issue 15): SQLAlchemy sends
no BEGIN/COMMIT of its own, a handler's writes commit with the inbox row or not at all,
a chained transaction is never left idle, and a connection that lost its server is
replaced, not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

import postroom
from postroom import Outbox, Router
from postroom import inbox as inbox_module
from postroom.dispatch import Pipeline, dispatch
from postroom.failures import Outcome
from postroom.lanes import Lanes
from postroom.message import Delivery, Message, uuid7
from postroom.outage import is_outage
from postroom.router import Context
from postroom.settings import Settings
from postroom.worker import Worker
from tests.helpers import delete_queues, eventually, running_relay


class Jotted(postroom.Event, topic="lanes.jotted"):
    n: int
    mode: str = "ok"  # ok | fail | swallow | wait


class CountingSession(AsyncSession):
    made = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        CountingSession.made += 1
        super().__init__(*args, **kwargs)


def _delivery(n: int, mode: str = "ok") -> Delivery:
    return Delivery.of(
        Message(
            message_id=uuid7(),
            topic=Jotted.topic,
            body=Jotted(n=n, mode=mode).model_dump_json().encode(),
            occurred_at=datetime.now(UTC),
        )
    )


@pytest.fixture
async def app_engine(database_url: str, names: str) -> AsyncIterator[AsyncEngine]:
    """An engine whose connections carry this test's application_name (pg_stat_activity)."""
    engine = create_async_engine(
        database_url, connect_args={"server_settings": {"application_name": f"lanes-{names}"}}
    )
    yield engine
    await engine.dispose()


@pytest.fixture
async def jots(settings: Settings, engine: AsyncEngine) -> str:
    """The handlers' own table, in the test's schema; returns its qualified name."""
    table = f'"{settings.schema_name}".jots'
    async with engine.begin() as connection:
        await connection.execute(text(f"CREATE TABLE {table} (message_id uuid, n int)"))
    return table


def _router(
    names: str, table: str, gates: dict[str, asyncio.Event] | None = None, *, orm: bool = True
) -> Router:
    router = Router()
    insert = text(f"INSERT INTO {table} (message_id, n) VALUES (:m, :n)")

    @router.consumer(f"lanes.{names}.core", Jotted, max_attempts=3)
    async def core(event: Jotted, ctx: Context) -> None:
        await ctx.connection.execute(insert, {"m": ctx.message.message_id, "n": event.n})
        if event.mode == "fail":
            raise RuntimeError("the handler fails after writing")
        if event.mode == "swallow":
            # The mistake under test: a database error caught and dropped.
            with contextlib.suppress(Exception):
                await ctx.connection.execute(text("SELECT 1 / 0"))
        if event.mode == "wait" and gates is not None:
            gates["inside"].set()
            await gates["go_on"].wait()  # meanwhile its backend is killed
            await ctx.connection.execute(insert, {"m": ctx.message.message_id, "n": -1})

    if not orm:
        return router

    @router.consumer(f"lanes.{names}.orm", Jotted, max_attempts=3)
    async def with_session(event: Jotted, ctx: Context) -> None:
        await ctx.session.execute(insert, {"m": ctx.message.message_id, "n": event.n})
        await ctx.publish(Jotted(n=event.n + 1000))

    return router


def _pipeline(settings: Settings, engine: AsyncEngine) -> Pipeline:
    return Pipeline(
        sessions=async_sessionmaker(engine, class_=CountingSession, expire_on_commit=False),
        outbox=Outbox.from_settings(settings),
        max_body_bytes=settings.max_body_bytes,
    )


async def _xmin(engine: AsyncEngine, sql: str, **params: Any) -> list[int]:
    async with engine.connect() as connection:
        result = await connection.execute(text(sql), params)
        return [int(row[0]) for row in result.all()]


async def test_postroom_alone_sends_begin_and_commit_and_writes_share_the_inbox_transaction(
    settings, engine, app_engine, jots, names
):
    router = _router(names, jots)
    pipeline = _pipeline(settings, app_engine)
    lanes = Lanes(app_engine, 1)
    simple: list[str] = []
    schema = settings.schema_name
    CountingSession.made = 0
    try:
        async with lanes.slot() as lane:
            await lane.open()
            # asyncpg logs the queries sent through Connection.execute/fetch* (BEGIN and
            # COMMIT from anyone, SQLAlchemy's transaction objects included, and our
            # claim), not SQLAlchemy's own prepared statements (the handler's insert).
            lane.driver.add_query_logger(lambda record: simple.append(record.query))
            core = [_delivery(n) for n in range(3)]
            for delivery in core:
                result = await dispatch(
                    delivery, router[f"lanes.{names}.core"], pipeline, lane=lane
                )
                assert result.outcome is Outcome.ACKED
            assert CountingSession.made == 0, "a handler that never touches ctx.session made one"
            orm = _delivery(7)
            result = await dispatch(orm, router[f"lanes.{names}.orm"], pipeline, lane=lane)
            assert result.outcome is Outcome.ACKED and CountingSession.made == 1
            assert not lane.begun
    finally:
        await lanes.close()
    claim = inbox_module._claim_sql(schema)
    assert simple == ["BEGIN", claim, "COMMIT"] * 4, simple
    for delivery in core:
        inbox = await _xmin(
            engine,
            f'SELECT xmin::text::bigint FROM "{schema}".inbox WHERE message_id = :m',
            m=delivery.message_id,
        )
        written = await _xmin(
            engine,
            f"SELECT xmin::text::bigint FROM {jots} WHERE message_id = :m",
            m=delivery.message_id,
        )
        assert len(inbox) == 1 and inbox == written, (
            "the handler's write and the inbox row: one commit"
        )
    inbox = await _xmin(
        engine,
        f'SELECT xmin::text::bigint FROM "{schema}".inbox WHERE message_id = :m',
        m=orm.message_id,
    )
    written = await _xmin(
        engine, f"SELECT xmin::text::bigint FROM {jots} WHERE message_id = :m", m=orm.message_id
    )
    published = await _xmin(engine, f'SELECT xmin::text::bigint FROM "{schema}".outbox')
    assert len(inbox) == 1 and inbox == written == published


async def test_a_waiting_delivery_gets_a_chained_transaction_and_none_is_left_idle(
    settings, engine, app_engine, jots, names
):
    router = _router(names, jots)
    consumer = router[f"lanes.{names}.core"]
    pipeline = _pipeline(settings, app_engine)
    lanes = Lanes(app_engine, 1)

    async def one(delivery: Delivery) -> Outcome:
        async with lanes.slot() as lane:
            return (await dispatch(delivery, consumer, pipeline, lane=lane)).outcome

    try:
        outcomes = await asyncio.gather(*(one(_delivery(n)) for n in range(20)))
        assert outcomes == [Outcome.ACKED] * 20
        assert lanes.chained >= 10, "deliveries waited for the one lane: commits chain"

        async def states() -> list[str]:
            async with engine.connect() as connection:
                result = await connection.execute(
                    text("SELECT state FROM pg_stat_activity WHERE application_name = :a"),
                    {"a": f"lanes-{names}"},
                )
                return [row[0] for row in result.all()]

        assert await states() == ["idle"], "the lane's connection, not idle in a transaction"
    finally:
        await lanes.close()
    count = await _xmin(engine, f"SELECT count(*) FROM {jots}")
    assert count == [20]


async def test_failed_and_swallowed_errors_leave_no_inbox_row_and_the_lane_goes_on(
    settings, engine, app_engine, jots, names
):
    router = _router(names, jots)
    consumer = router[f"lanes.{names}.core"]
    pipeline = _pipeline(settings, app_engine)
    lanes = Lanes(app_engine, 1)
    schema = settings.schema_name
    try:
        async with lanes.slot() as lane:
            await lane.open()
            pid = lane.driver.get_server_pid()
            failed, swallowed, fine = _delivery(1, "fail"), _delivery(2, "swallow"), _delivery(3)
            # A handler that caught a database error: PostgreSQL answers COMMIT with
            # ROLLBACK and no error; that must be a failed attempt, not an ack.
            for delivery in (failed, swallowed):
                result = await dispatch(delivery, consumer, pipeline, lane=lane)
                assert result.outcome is Outcome.RETRY, delivery
            result = await dispatch(fine, consumer, pipeline, lane=lane)
            assert result.outcome is Outcome.ACKED
            assert lane.driver.get_server_pid() == pid, "the same connection goes on"
    finally:
        await lanes.close()
    for delivery, expected in ((failed, 0), (swallowed, 0), (fine, 1)):
        rows = await _xmin(
            engine,
            f'SELECT count(*) FROM "{schema}".inbox WHERE message_id = :m',
            m=delivery.message_id,
        )
        writes = await _xmin(
            engine, f"SELECT count(*) FROM {jots} WHERE message_id = :m", m=delivery.message_id
        )
        assert rows == writes == [expected], delivery
    retries = await _xmin(engine, f'SELECT count(*) FROM "{schema}".outbox')
    assert retries == [2]


async def test_a_connection_killed_mid_transaction_is_requeued_and_replaced(
    settings, engine, app_engine, jots, names
):
    gates = {"inside": asyncio.Event(), "go_on": asyncio.Event()}
    router = _router(names, jots, gates)
    consumer = router[f"lanes.{names}.core"]
    pipeline = _pipeline(settings, app_engine)
    lanes = Lanes(app_engine, 1)
    schema = settings.schema_name
    first = _delivery(1, "wait")
    try:
        async with lanes.slot() as lane:
            await lane.open()
            pid = lane.driver.get_server_pid()
            running = asyncio.create_task(dispatch(first, consumer, pipeline, lane=lane))
            await asyncio.wait_for(gates["inside"].wait(), 10)
            killer = await asyncpg.connect(settings.asyncpg_dsn)
            try:
                assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
            finally:
                await killer.close()
            gates["go_on"].set()
            with pytest.raises(Exception) as caught:
                await asyncio.wait_for(running, 30)
            assert is_outage(caught.value), "the worker requeues it (no retry row, no attempt)"
            assert lane.connection is None, "a connection that lost its server is not kept"
            retries = await _xmin(engine, f'SELECT count(*) FROM "{schema}".outbox')
            assert retries == [0]
            # The redelivery of the same message, on a fresh connection of the same lane.
            result = await dispatch(first, consumer, pipeline, lane=lane)
            assert result.outcome is Outcome.ACKED
            assert lane.driver.get_server_pid() != pid
            after = await dispatch(_delivery(2), consumer, pipeline, lane=lane)
            assert after.outcome is Outcome.ACKED
    finally:
        await lanes.close()
    rows = await _xmin(
        engine, f'SELECT count(*) FROM "{schema}".inbox WHERE message_id = :m', m=first.message_id
    )
    writes = await _xmin(engine, f"SELECT n FROM {jots} WHERE message_id = :m", m=first.message_id)
    assert rows == [1] and sorted(writes) == [-1, 1], "applied once, by the redelivery"


async def test_a_worker_leaves_no_connection_idle_in_a_transaction_once_the_queue_is_empty(
    settings, engine, jots, names, amqp
):
    router = _router(names, jots, orm=False)
    app = settings.model_copy(update={"worker_concurrency": 2, "shutdown_timeout": 5.0})
    worker = Worker(app, router, name=f"lanes-{names}")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    box = Outbox.from_settings(app)
    n = 200
    try:
        await eventually(lambda: worker.ready or task.done(), timeout=20)
        assert worker.ready, task
        async with running_relay(app):
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            async with sessions() as session, session.begin():
                for i in range(n):
                    await box.publish(session, Jotted(n=i))

            async def done() -> bool:
                count = await _xmin(engine, f"SELECT count(*) FROM {jots}")
                return count == [n]

            await eventually(done, timeout=120)

        async def states() -> list[str] | None:
            async with engine.connect() as connection:
                result = await connection.execute(
                    text("SELECT state FROM pg_stat_activity WHERE application_name = :a"),
                    {"a": f"lanes-{names}"},
                )
                found = sorted(row[0] for row in result.all())
            return found if found and "idle in transaction" not in found else None

        # Each lane rolls back its chained transaction when nobody waits; a lane left
        # begun would stay "idle in transaction" for good and fail this wait.
        assert await eventually(states, timeout=10)
        assert worker._lanes.chained > 0, "the run chained commits: the case under test"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
        await delete_queues(amqp, router)
