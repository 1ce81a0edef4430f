"""The write path: one row in the caller's transaction, refusals before anything is written."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest
from sqlalchemy import Integer, String, event, func, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from postroom import Event, Outbox
from postroom.errors import (
    EventDefinitionError,
    InvalidMessageError,
    MessageTooLargeError,
    NotInTransactionError,
)
from postroom.outbox import notify_channel
from postroom.settings import Settings
from postroom.tables import outbox, schema_map
from tests.helpers import eventually


class OrderPlaced(Event, topic="shop.order-placed"):
    order_id: int
    total_cents: int


class NoTopic(Event):
    x: int


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "note_never_created"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String)


async def count_rows(sessions: async_sessionmaker, settings: Settings) -> int:  # type: ignore[type-arg]
    async with sessions() as session:
        result = await session.execute(
            select(func.count()).select_from(outbox),
            execution_options={"schema_translate_map": schema_map(settings.schema_name)},
        )
        return int(result.scalar_one())


async def test_publish_writes_one_row_that_commits_with_the_transaction(settings, sessions):
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        message = await box.publish(session, OrderPlaced(order_id=1, total_cents=250), key="o-1")
    async with sessions() as session:
        row = (
            await session.execute(
                select(outbox),
                execution_options={"schema_translate_map": schema_map(settings.schema_name)},
            )
        ).one()
    assert row.message_id == message.message_id
    assert message.message_id.version == 7
    assert row.topic == "shop.order-placed" and row.routing_key == "shop.order-placed"
    assert row.ordering_key == "o-1" and row.exchange is None
    assert row.body == b'{"order_id":1,"total_cents":250}'
    assert row.headers["cloudEvents_id"] == str(message.message_id)
    assert row.headers["cloudEvents_type"] == "shop.order-placed"
    assert row.headers["postroom-attempt"] == 1
    assert row.headers["traceparent"].startswith("00-")
    assert row.available_at <= row.created_at + timedelta(seconds=1)


async def test_rollback_leaves_no_row(settings, sessions):
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        await box.publish(session, OrderPlaced(order_id=1, total_cents=1))
        await session.rollback()
    assert await count_rows(sessions, settings) == 0


async def test_publish_outside_a_transaction_is_refused(settings, sessions):
    box = Outbox.from_settings(settings)
    async with sessions() as session:
        with pytest.raises(NotInTransactionError, match="open transaction"):
            await box.publish(session, OrderPlaced(order_id=1, total_cents=1))
    assert await count_rows(sessions, settings) == 0


async def test_autocommit_connection_is_refused(settings, engine):
    box = Outbox.from_settings(settings)
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    async with async_sessionmaker(auto)() as session, session.begin():
        with pytest.raises(NotInTransactionError, match="AUTOCOMMIT"):
            await box.publish(session, OrderPlaced(order_id=1, total_cents=1))


async def test_oversized_body_is_refused_before_commit(settings, sessions):
    box = Outbox(schema=settings.schema_name, max_body_bytes=20)
    async with sessions() as session, session.begin():
        with pytest.raises(MessageTooLargeError, match="limit is 20"):
            await box.publish(session, OrderPlaced(order_id=123456789, total_cents=123456789))
    assert await count_rows(sessions, settings) == 0


async def test_event_without_topic_is_refused(settings, sessions):
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        with pytest.raises(EventDefinitionError, match="NoTopic has no topic"):
            await box.publish(session, NoTopic(x=1))
    assert await count_rows(sessions, settings) == 0


async def test_reserved_headers_are_refused(settings, sessions):
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        for bad in ({"x-delay": 1}, {"postroom-attempt": 3}, {"ok": [1, 2]}):
            with pytest.raises(InvalidMessageError):
                await box.publish(session, OrderPlaced(order_id=1, total_cents=1), headers=bad)  # type: ignore[arg-type]


async def test_publish_does_not_flush_the_callers_pending_objects(settings, sessions):
    # Note's table does not exist: a flush would fail. publish must leave it pending.
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        note = Note(id=1, text="pending")
        session.add(note)
        await box.publish(session, OrderPlaced(order_id=1, total_cents=1))
        assert note in session.new
        session.expunge(note)


async def test_delay_sets_available_at_in_the_future(settings, sessions):
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        await box.publish(session, OrderPlaced(order_id=1, total_cents=1), delay=timedelta(hours=1))
    async with sessions() as session:
        row = (
            await session.execute(
                select(outbox.c.available_at - outbox.c.created_at),
                execution_options={"schema_translate_map": schema_map(settings.schema_name)},
            )
        ).scalar_one()
    assert timedelta(minutes=59) < row <= timedelta(hours=1, seconds=1)


async def test_many_publishes_in_one_transaction_share_one_notify(settings, engine, sessions):
    """One NOTIFY statement per transaction, and a listener hears each committed one.

    PostgreSQL folds identical notifications of one transaction into one, so a listener
    alone cannot tell one NOTIFY from three: the statements sent are counted on the
    engine, the notifications received on a LISTEN connection.
    """
    box = Outbox.from_settings(settings)
    sent: list[str] = []

    def count_notify(conn, cursor, statement, parameters, context, executemany) -> None:
        if "pg_notify" in statement:
            sent.append(statement)

    heard: list[str] = []
    listener = await asyncpg.connect(settings.asyncpg_dsn)
    await listener.add_listener(
        notify_channel(settings.schema_name), lambda *args: heard.append(args[2])
    )
    event.listen(engine.sync_engine, "before_cursor_execute", count_notify)
    try:
        async with sessions() as session, session.begin():
            for i in range(3):
                await box.publish(session, OrderPlaced(order_id=i, total_cents=1))
        await eventually(lambda: len(heard) == 1)
        async with sessions() as session, session.begin():
            await box.publish(session, OrderPlaced(order_id=3, total_cents=1))
        await eventually(lambda: len(heard) == 2)
        async with sessions() as session:
            await session.begin()
            await box.publish(session, OrderPlaced(order_id=4, total_cents=1))
            await session.rollback()
        # The committed pair is heard; the rollback must add nothing: a fourth commit,
        # heard after it, proves the listener was still listening when it would have come.
        async with sessions() as session, session.begin():
            await box.publish(session, OrderPlaced(order_id=5, total_cents=1))
        await eventually(lambda: len(heard) >= 3)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count_notify)
        await listener.close()
    assert len(sent) == 4, "one NOTIFY statement per publishing transaction"
    assert len(heard) == 3, "one notification per commit, none for the rollback"
    assert await count_rows(sessions, settings) == 5
