"""The fault suite's consumer app, loaded by real `postroom worker` subprocesses.

Two consumers of one topic, as a service would have: ``faults.apply`` asks for per-key
order and rejects poison entries at once; ``faults.audit`` is unordered and fails on poison
entries every time, so they are dead letters only after their attempts run out
(``batch_router``: the same, with ``faults.audit`` a batch handler). Each handler
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
from sqlalchemy.ext.asyncio import AsyncSession

import postroom
from postroom.router import Context

APPLY = "faults.apply"
AUDIT = "faults.audit"


class Entry(postroom.Event, topic="faults.entry"):
    key: str | None
    seq: int
    poison: bool = False
    sleep: float = 0.0


async def record(consumer: str, event: Entry, ctx: Context) -> None:
    await record_effect(consumer, event, ctx.message, ctx.session, ctx.outbox.schema)


async def record_effect(
    consumer: str, event: Entry, message: postroom.Message, session: AsyncSession, schema: str
) -> None:
    position = 0
    if event.key is not None:
        result = await session.execute(
            text(
                f'INSERT INTO "{schema}".fault_heads AS h (consumer, key, n) '
                "VALUES (:consumer, :key, 1) ON CONFLICT (consumer, key) "
                "DO UPDATE SET n = h.n + 1 RETURNING h.n"
            ),
            {"consumer": consumer, "key": event.key},
        )
        position = result.scalar_one()
    await session.execute(
        text(
            f'INSERT INTO "{schema}".fault_effects '
            "(consumer, message_id, key, seq, position, attempt) "
            "VALUES (:consumer, :message_id, :key, :seq, :position, :attempt)"
        ),
        {
            "consumer": consumer,
            "message_id": message.message_id,
            "key": event.key,
            "seq": event.seq,
            "position": position,
            "attempt": message.attempt,
        },
    )
    if event.sleep:
        await asyncio.sleep(event.sleep)  # a slow handler, holding its key's row lock


ordered = postroom.Router()


@ordered.consumer(
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


router = postroom.Router()
router.include(ordered)


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


batch_router = postroom.Router()
"""The same app with ``faults.audit`` as a batch handler (``batch=True``)."""
batch_router.include(ordered)


@batch_router.consumer(
    AUDIT,
    Entry,
    batch=True,
    max_attempts=2,
    backoff=timedelta(milliseconds=100),
    backoff_cap=timedelta(milliseconds=300),
)
async def audit_batch(events: list[Entry], ctx: postroom.BatchContext) -> None:
    for event, message in zip(events, ctx.messages, strict=True):
        await record_effect(AUDIT, event, message, ctx.session, ctx.outbox.schema)
    if any(event.poison for event in events):  # the batch fails; alone, only the poison
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
