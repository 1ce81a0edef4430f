"""A consumer app used by the tests, loaded by real `postroom worker` subprocesses.

Handlers record each committed effect in an ``effects`` table of the test's own schema
(found through ``ctx.outbox.schema``), so tests can count effects per message id.
"""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta

from sqlalchemy import text

import postroom
from postroom.router import Context


class Charge(postroom.Event, topic="billing.charge"):
    id: int
    mode: str = "ok"  # ok | fail_until | always | reject | crash | slow | follow_up
    n: int = 0
    sleep: float = 0.0


class Charged(postroom.Event, topic="billing.charged"):
    id: int


router = postroom.Router()


async def record_effect(consumer: str, event: Charge, ctx: Context) -> None:
    await ctx.session.execute(
        text(
            f'INSERT INTO "{ctx.outbox.schema}".effects (consumer, message_id, event_id, attempt) '
            "VALUES (:consumer, :message_id, :event_id, :attempt)"
        ),
        {
            "consumer": consumer,
            "message_id": ctx.message.message_id,
            "event_id": event.id,
            "attempt": ctx.attempt,
        },
    )


@router.consumer(
    "billing.charge",
    Charge,
    max_attempts=3,
    backoff=timedelta(milliseconds=200),
    backoff_cap=timedelta(seconds=1),
)
async def charge(event: Charge, ctx: Context) -> None:
    await record_effect("billing.charge", event, ctx)
    if event.mode == "fail_until" and ctx.attempt < event.n:
        raise RuntimeError(f"transient failure on attempt {ctx.attempt}")
    if event.mode == "always":
        raise TimeoutError("the payment provider timed out")
    if event.mode == "reject":
        raise postroom.Reject("card number is invalid")
    if event.mode == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if event.mode == "slow":
        await asyncio.sleep(event.sleep)
    if event.mode == "follow_up":
        await ctx.publish(Charged(id=event.id), key=f"charge-{event.id}")


@router.consumer("billing.audit", Charge)
async def audit(event: Charge, ctx: Context) -> None:
    await record_effect("billing.audit", event, ctx)


EFFECTS_DDL = (
    'CREATE TABLE "{schema}".effects ('
    "consumer text NOT NULL, message_id uuid NOT NULL, event_id int NOT NULL, "
    "attempt int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
)


batch_router = postroom.Router()
"""A batch consumer of the same events: one handler call per batch, one statement for its
rows. ``ledger_calls`` holds each call's batch size (the in-process tests read it)."""

ledger_calls: list[int] = []


@batch_router.consumer(
    "billing.ledger",
    Charge,
    batch=True,
    max_attempts=3,
    backoff=timedelta(milliseconds=200),
    backoff_cap=timedelta(seconds=1),
)
async def ledger(events: list[Charge], ctx: postroom.BatchContext) -> None:
    """Book charges in the ledger, a batch at a time."""
    ledger_calls.append(len(events))
    await ctx.connection.execute(
        text(
            f'INSERT INTO "{ctx.outbox.schema}".effects (consumer, message_id, event_id, attempt) '
            "VALUES (:consumer, :message_id, :event_id, :attempt)"
        ),
        [
            {
                "consumer": "billing.ledger",
                "message_id": message.message_id,
                "event_id": event.id,
                "attempt": message.attempt,
            }
            for event, message in zip(events, ctx.messages, strict=True)
        ],
    )
    for event, message in zip(events, ctx.messages, strict=True):
        if event.mode == "fail_until" and message.attempt < event.n:
            raise RuntimeError(f"transient failure on attempt {message.attempt}")
        if event.mode == "always":
            raise TimeoutError("the ledger timed out")
        if event.mode == "reject":
            raise postroom.Reject(f"charge {event.id} is invalid")
        if event.mode == "follow_up":
            await ctx.publish(Charged(id=event.id), cause=message, key=f"charge-{event.id}")
