"""The fault suite's consumer app, loaded by real `postroom worker` subprocesses.

Two consumers of one topic, as a service would have: ``faults.apply`` asks for per-key
order and rejects poison entries at once; ``faults.audit`` is unordered and fails on poison
entries every time, so they are dead letters only after their attempts run out. Each handler
writes its effect row ``(consumer, message_id, key, seq)`` in the handler's transaction,
into the test schema's ``fault_effects`` table (found through ``ctx.outbox.schema``), so
"applied" is read from the database. Each keyed effect also takes its position in its key's
history from a counter row in ``fault_heads``: the row lock is held until commit, so positions
are in *commit* order per key even if two workers ever ran one key at once (an id or a clock
read would give the order in which the transactions started).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import text

import postroom
from postroom.router import Context

APPLY = "faults.apply"
AUDIT = "faults.audit"


class Entry(postroom.Event, topic="faults.entry"):
    key: str | None
    seq: int
    poison: bool = False
    sleep: float = 0.0


router = postroom.Router()


async def record(consumer: str, event: Entry, ctx: Context) -> None:
    schema = ctx.outbox.schema
    position = 0
    if event.key is not None:
        result = await ctx.session.execute(
            text(
                f'INSERT INTO "{schema}".fault_heads AS h (consumer, key, n) '
                "VALUES (:consumer, :key, 1) ON CONFLICT (consumer, key) "
                "DO UPDATE SET n = h.n + 1 RETURNING h.n"
            ),
            {"consumer": consumer, "key": event.key},
        )
        position = result.scalar_one()
    await ctx.session.execute(
        text(
            f'INSERT INTO "{schema}".fault_effects '
            "(consumer, message_id, key, seq, position, attempt) "
            "VALUES (:consumer, :message_id, :key, :seq, :position, :attempt)"
        ),
        {
            "consumer": consumer,
            "message_id": ctx.message.message_id,
            "key": event.key,
            "seq": event.seq,
            "position": position,
            "attempt": ctx.attempt,
        },
    )
    if event.sleep:
        await asyncio.sleep(event.sleep)  # a slow handler, holding its key's row lock


@router.consumer(
    APPLY,
    Entry,
    ordered=True,
    max_attempts=3,
    backoff=timedelta(milliseconds=50),
    backoff_cap=timedelta(milliseconds=500),
)
async def apply(event: Entry, ctx: Context) -> None:
    await record(APPLY, event, ctx)  # rolled back with the rejection: never an effect
    if event.poison:
        raise postroom.Reject(f"poison entry {event.key}/{event.seq}")


@router.consumer(
    AUDIT,
    Entry,
    max_attempts=2,
    backoff=timedelta(milliseconds=100),
    backoff_cap=timedelta(milliseconds=300),
)
async def audit(event: Entry, ctx: Context) -> None:
    await record(AUDIT, event, ctx)
    if event.poison:
        raise RuntimeError("the audit service always fails on this entry")


DDL = (
    'CREATE TABLE "{schema}".fault_effects ('
    "id bigserial PRIMARY KEY, consumer text NOT NULL, message_id uuid NOT NULL, "
    "key text, seq int NOT NULL, position int NOT NULL, attempt int NOT NULL, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    'CREATE TABLE "{schema}".fault_heads ('
    "consumer text, key text, n int NOT NULL, PRIMARY KEY (consumer, key))",
    'CREATE TABLE "{schema}".fault_accounts (key text PRIMARY KEY, seq int NOT NULL)',
    'CREATE TABLE "{schema}".fault_entries ('
    "message_id uuid PRIMARY KEY, key text, seq int NOT NULL, poison bool NOT NULL)",
)
"""The app's tables: effects (read by the checker) and the writers' business rows."""
