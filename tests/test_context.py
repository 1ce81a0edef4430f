"""The handler's handles: ctx.connection always, an ORM session only when touched (issue 15)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import postroom
from postroom import Outbox, Router
from postroom.dispatch import Pipeline, dispatch
from postroom.failures import Outcome
from postroom.message import Delivery, Message, uuid7
from postroom.router import Context


class Noted(postroom.Event, topic="context.noted"):
    n: int


class CountingSession(AsyncSession):
    made = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        CountingSession.made += 1
        super().__init__(*args, **kwargs)


def _delivery(n: int) -> Delivery:
    return Delivery.of(
        Message(
            message_id=uuid7(),
            topic=Noted.topic,
            body=Noted(n=n).model_dump_json().encode(),
            occurred_at=datetime.now(UTC),
        )
    )


async def test_a_session_is_made_only_when_touched_and_shares_the_inbox_transaction(
    settings, engine, names
):
    sessions = async_sessionmaker(engine, class_=CountingSession, expire_on_commit=False)
    pipeline = Pipeline(
        sessions=sessions,
        outbox=Outbox.from_settings(settings),
        max_body_bytes=settings.max_body_bytes,
    )
    router = Router()
    seen: dict[str, Any] = {}

    @router.consumer(f"context.{names}.core", Noted)
    async def core_only(event: Noted, ctx: Context) -> None:
        seen["core"] = await ctx.connection.scalar(text("SELECT txid_current()"))

    @router.consumer(f"context.{names}.orm", Noted)
    async def with_session(event: Noted, ctx: Context) -> None:
        seen["connection"] = await ctx.connection.scalar(text("SELECT txid_current()"))
        seen["session"] = await ctx.session.scalar(text("SELECT txid_current()"))
        await ctx.publish(Noted(n=event.n + 1))  # through the session, same transaction

    CountingSession.made = 0
    core = _delivery(1)
    result = await dispatch(core, router[f"context.{names}.core"], pipeline)
    assert result.outcome is Outcome.ACKED and "core" in seen
    assert CountingSession.made == 0, "a handler that never touches ctx.session made one"

    orm = _delivery(2)
    result = await dispatch(orm, router[f"context.{names}.orm"], pipeline)
    assert result.outcome is Outcome.ACKED
    assert CountingSession.made == 1
    assert seen["session"] == seen["connection"]
    schema = settings.schema_name
    async with engine.connect() as connection:
        inbox_tx = await connection.scalar(
            text(
                f'SELECT xmin::text::bigint FROM "{schema}".inbox '
                "WHERE consumer = :c AND message_id = :m"
            ),
            {"c": f"context.{names}.orm", "m": orm.message_id},
        )
        outbox_tx = await connection.scalar(
            text(f'SELECT xmin::text::bigint FROM "{schema}".outbox WHERE topic = :t'),
            {"t": Noted.topic},
        )
    # The inbox row, the session's writes and the published event: one transaction.
    assert inbox_tx == outbox_tx == seen["session"] % 2**32
