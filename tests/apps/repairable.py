"""The ops tests' consumer app: one consumer that fails until it is "fixed", one that never fails.

``books.apply`` raises while the ``switches`` row of the test's schema says it is broken, so a
test deploys the fix with one UPDATE; ``books.notify`` subscribes to the same topic and always
succeeds. Both record each committed effect, with the message's replay count, in
``books_effects``.
"""

from __future__ import annotations

from sqlalchemy import text

import postroom
from postroom.message import H_REPLAYS
from postroom.router import Context


class Posted(postroom.Event, topic="books.posted"):
    id: int
    fail: str = ""  # "" (healthy) | timeout | missing (both while broken) | always


router = postroom.Router()

DDL = (
    'CREATE TABLE "{schema}".switches (name text PRIMARY KEY, broken boolean NOT NULL)',
    """INSERT INTO "{schema}".switches VALUES ('books.apply', true)""",
    'CREATE TABLE "{schema}".books_effects (consumer text NOT NULL, message_id uuid NOT NULL, '
    "event_id int NOT NULL, attempt int NOT NULL, replays int NOT NULL, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
)


async def _record(consumer: str, event: Posted, ctx: Context) -> None:
    await ctx.session.execute(
        text(
            f'INSERT INTO "{ctx.outbox.schema}".books_effects '
            "(consumer, message_id, event_id, attempt, replays) "
            "VALUES (:consumer, :message_id, :event_id, :attempt, :replays)"
        ),
        {
            "consumer": consumer,
            "message_id": ctx.message.message_id,
            "event_id": event.id,
            "attempt": ctx.attempt,
            "replays": int(ctx.message.extra_headers.get(H_REPLAYS) or 0),
        },
    )


@router.consumer("books.apply", Posted, max_attempts=1)
async def apply(event: Posted, ctx: Context) -> None:
    if event.fail == "always":
        raise RuntimeError("this entry can never be applied")
    if event.fail:
        broken = await ctx.session.scalar(
            text(f"SELECT broken FROM \"{ctx.outbox.schema}\".switches WHERE name = 'books.apply'")
        )
        if broken and event.fail == "missing":
            raise LookupError(f"account 'acct-{event.id}' not found")
        if broken:
            raise TimeoutError(f"books timed out after {100 * event.id} ms")
    await _record("books.apply", event, ctx)


@router.consumer("books.notify", Posted)
async def notify(event: Posted, ctx: Context) -> None:
    await _record("books.notify", event, ctx)
