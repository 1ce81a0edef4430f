"""What a failed delivery becomes: a retry for later or a dead letter, and its record.

Pure decisions (:func:`judge`, :func:`dead`, :func:`undecodable`) plus :func:`write`,
which puts the outcome in the caller's transaction; :mod:`postroom.dispatch` decides
which transaction that is.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from postroom import deadletters
from postroom.deadletters import DeadLetter, DeadReason
from postroom.errors import Reject
from postroom.message import (
    H_CONSUMER,
    H_FIRST_FAILED,
    H_LAST_ERROR,
    H_REPLAYS,
    Delivery,
    Message,
    json_safe,
)
from postroom.outbox import Outbox
from postroom.router import Consumer

log = structlog.get_logger("postroom.dispatch")

DEFAULT_EXCHANGE = ""  # AMQP's default exchange routes by queue name


class Outcome(enum.StrEnum):
    """What happened to a delivery; every one of them is acked by the worker."""

    ACKED = "acked"
    """The handler ran and its writes committed with the inbox row."""
    DUPLICATE = "duplicate"
    """The inbox already held this message for this consumer; the handler did not run."""
    RETRY = "retry"
    """The handler failed; a copy for the next attempt is committed in the outbox."""
    DEAD = "dead"
    """The message is recorded as a dead letter with its reason."""


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one dispatch and the facts worth logging about it."""

    outcome: Outcome
    message_id: str | None
    topic: str | None
    attempt: int
    reason: DeadReason | None = None
    error: str | None = None
    occurred_at: datetime | None = None
    """When the event was published; the start of its end-to-end latency."""
    replayed: bool = False
    """True for a dead letter sent again by a replay (it carries ``postroom-replays``)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed delivery's outcome, to be written in some transaction: a retry or a letter."""

    result: Result
    letter: DeadLetter | None = None
    retry: Message | None = None
    delay: timedelta | None = None


def judge(message: Message, consumer: Consumer[Any], exc: Exception) -> Failure:
    """Decide what a handler's exception means: dead now, dead at last, or retry later."""
    if isinstance(exc, Reject):
        return dead(message, consumer, DeadReason.REJECTED, exc)
    if message.attempt >= consumer.retry.max_attempts:
        return dead(message, consumer, DeadReason.EXHAUSTED, exc)
    error_type, error_message, _ = deadletters.describe(exc)
    first_failed = message.extra_headers.get(H_FIRST_FAILED) or datetime.now(UTC).isoformat()
    retry = message.next_attempt(
        **{
            H_CONSUMER: consumer.name,
            H_FIRST_FAILED: first_failed,
            H_LAST_ERROR: f"{error_type}: {error_message}"[:500],
        }
    )
    return Failure(
        result=result_of(Outcome.RETRY, message, error=f"{error_type}: {error_message}"),
        retry=retry,
        delay=consumer.retry.delay(message.attempt),
    )


def dead(
    message: Message, consumer: Consumer[Any], reason: DeadReason, exc: BaseException
) -> Failure:
    error_type, error_message, trace = deadletters.describe(exc)
    now = datetime.now(UTC)
    letter = DeadLetter(
        consumer=consumer.name,
        message_id=str(message.message_id),
        topic=message.topic,
        reason=reason,
        error_type=error_type,
        error_message=error_message,
        traceback=trace,
        attempts=message.attempt,
        first_failed_at=_parse_time(message.extra_headers.get(H_FIRST_FAILED)) or now,
        last_failed_at=now,
        headers=json_safe(message.amqp_headers()),
        body=message.body,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
    )
    result = result_of(Outcome.DEAD, message, reason=reason, error=f"{error_type}: {error_message}")
    return Failure(result=result, letter=letter)


def undecodable(
    delivery: Delivery, consumer: Consumer[Any], reason: DeadReason, exc: BaseException
) -> Failure:
    """Dead-letter a delivery we could not even decode, keeping every byte of it."""
    error_type, error_message, _ = deadletters.describe(exc)
    now = datetime.now(UTC)
    message_id = delivery.message_id or "sha256:" + hashlib.sha256(delivery.body).hexdigest()[:32]
    letter = DeadLetter(
        consumer=consumer.name,
        message_id=message_id[:200],
        topic=delivery.type,
        reason=reason,
        error_type=error_type,
        error_message=error_message,
        traceback=None,
        attempts=1,
        first_failed_at=now,
        last_failed_at=now,
        headers=json_safe(dict(delivery.headers)),
        body=delivery.body,
        content_type=delivery.content_type,
        correlation_id=delivery.correlation_id,
    )
    result = Result(
        outcome=Outcome.DEAD,
        message_id=message_id,
        topic=delivery.type,
        attempt=1,
        reason=reason,
        error=f"{error_type}: {error_message}",
    )
    return Failure(result=result, letter=letter)


async def write(
    session: AsyncSession, failure: Failure, consumer: Consumer[Any], outbox: Outbox
) -> None:
    """Write a failure's retry row or dead letter in the caller's transaction."""
    if failure.retry is not None:
        await outbox.write(
            session,
            failure.retry,
            exchange=DEFAULT_EXCHANGE,
            routing_key=consumer.name,
            delay=failure.delay,
        )
    elif failure.letter is not None:
        letter = deadletters.redact(failure.letter, consumer.redaction)
        await deadletters.record(session, letter, schema=outbox.schema)


def log_failure(failure: Failure, consumer: Consumer[Any]) -> None:
    """Log a failure once its transaction committed (not before: it might not)."""
    result = failure.result
    fields = {
        "message_id": result.message_id,
        "consumer": consumer.name,
        "topic": result.topic,
        "attempt": result.attempt,
        "error": result.error,
    }
    if failure.retry is not None:
        delay = round(failure.delay.total_seconds(), 3) if failure.delay else 0
        log.info("message.retry_scheduled", retry_in_seconds=delay, **fields)
    else:
        reason = result.reason.value if result.reason else None
        log.warning("message.dead_lettered", reason=reason, **fields)


def result_of(outcome: Outcome, message: Message, **extra: Any) -> Result:
    """The :class:`Result` of *message*, with its identity filled in."""
    return Result(
        outcome=outcome,
        message_id=str(message.message_id),
        topic=message.topic,
        attempt=message.attempt,
        occurred_at=message.occurred_at,
        replayed=H_REPLAYS in message.extra_headers,
        **extra,
    )


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
