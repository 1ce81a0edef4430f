"""Handle one delivery for one consumer: message in, outcome out, no broker involved.

The pipeline is fixed, not a stack of optional middleware: size check, decode, then one
transaction holding the inbox row, the handler's writes and the events it publishes.
A failure either schedules a retry (an outbox row for this consumer's queue only, due
after a backoff) or records a dead letter, in a transaction of its own. The worker maps
the outcome to an AMQP ack; the testing helpers call this very function.

Anything raised out of :func:`dispatch` means the pipeline could not record an outcome
(typically the database is away): the caller must requeue the message, never drop it.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postroom import deadletters, faults, inbox
from postroom.deadletters import DeadLetter, DeadReason
from postroom.errors import DecodeError, DeliveryLimitExceededError, Reject, UnknownTopicError
from postroom.message import (
    H_CONSUMER,
    H_FIRST_FAILED,
    H_LAST_ERROR,
    Delivery,
    Message,
    json_safe,
)
from postroom.outbox import Outbox
from postroom.router import Consumer, Context

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


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The collaborators dispatch needs; built once per worker."""

    sessions: async_sessionmaker[AsyncSession]
    outbox: Outbox
    max_body_bytes: int
    crash_at: str | None = None

    @property
    def schema(self) -> str:
        return self.outbox.schema


async def dispatch(delivery: Delivery, consumer: Consumer[Any], pipeline: Pipeline) -> Result:
    """Run *delivery* through *consumer*'s pipeline and return the outcome.

    Guarantees: the handler's writes commit at most once per (consumer, message id);
    a failure is retried or dead-lettered durably before this returns. Raises only when
    no outcome could be recorded; then nothing was committed and the message must be
    requeued.
    """
    if len(delivery.body) > pipeline.max_body_bytes:
        error = DecodeError(
            f"body is {len(delivery.body)} bytes; the limit is {pipeline.max_body_bytes}"
        )
        return await _dead_undecoded(delivery, consumer, pipeline, DeadReason.TOO_LARGE, error)
    try:
        message = delivery.decode()
    except DecodeError as exc:
        return await _dead_undecoded(delivery, consumer, pipeline, DeadReason.UNDECODABLE, exc)
    if message.topic not in consumer.topics:
        handled = ", ".join(consumer.topics)
        error = UnknownTopicError(
            f"consumer {consumer.name!r} handles {handled}, not {message.topic!r}"
        )
        return await _dead(message, consumer, pipeline, DeadReason.UNKNOWN_TOPIC, error)
    try:
        event = consumer.event_type.model_validate_json(message.body)
    except ValidationError as exc:
        error = DecodeError(
            f"payload does not match {consumer.event_type.__name__}: {_summary(exc)}"
        )
        return await _dead(message, consumer, pipeline, DeadReason.UNDECODABLE, error)

    try:
        async with pipeline.sessions() as session, session.begin():
            fresh = await inbox.claim(
                session,
                schema=pipeline.schema,
                consumer=consumer.name,
                message_id=message.message_id,
            )
            if not fresh:
                return _result(Outcome.DUPLICATE, message)
            context = Context(
                session=session, message=message, consumer=consumer.name, outbox=pipeline.outbox
            )
            faults.crash_point(pipeline.crash_at, faults.WORKER_IN_HANDLER)
            await consumer.handler(event, context)
    except Reject as exc:
        return await _dead(message, consumer, pipeline, DeadReason.REJECTED, exc)
    except Exception as exc:
        if message.attempt >= consumer.retry.max_attempts:
            return await _dead(message, consumer, pipeline, DeadReason.EXHAUSTED, exc)
        return await _retry(message, consumer, pipeline, exc)
    return _result(Outcome.ACKED, message)


async def _retry(
    message: Message, consumer: Consumer[Any], pipeline: Pipeline, exc: Exception
) -> Result:
    delay = consumer.retry.delay(message.attempt)
    error_type, error_message, _ = deadletters.describe(exc)
    first_failed = message.extra_headers.get(H_FIRST_FAILED) or datetime.now(UTC).isoformat()
    retry = message.next_attempt(
        **{
            H_CONSUMER: consumer.name,
            H_FIRST_FAILED: first_failed,
            H_LAST_ERROR: f"{error_type}: {error_message}"[:500],
        }
    )
    async with pipeline.sessions() as session, session.begin():
        await pipeline.outbox.write(
            session, retry, exchange=DEFAULT_EXCHANGE, routing_key=consumer.name, delay=delay
        )
    log.info(
        "message.retry_scheduled",
        message_id=str(message.message_id),
        consumer=consumer.name,
        topic=message.topic,
        attempt=message.attempt,
        retry_in_seconds=round(delay.total_seconds(), 3),
        error_type=error_type,
    )
    return _result(Outcome.RETRY, message, error=f"{error_type}: {error_message}")


async def _dead(
    message: Message,
    consumer: Consumer[Any],
    pipeline: Pipeline,
    reason: DeadReason,
    exc: BaseException,
) -> Result:
    error_type, error_message, trace = deadletters.describe(exc)
    now = datetime.now(UTC)
    first = _parse_time(message.extra_headers.get(H_FIRST_FAILED)) or now
    letter = DeadLetter(
        consumer=consumer.name,
        message_id=str(message.message_id),
        topic=message.topic,
        reason=reason,
        error_type=error_type,
        error_message=error_message,
        traceback=trace,
        attempts=message.attempt,
        first_failed_at=first,
        last_failed_at=now,
        headers=json_safe(message.amqp_headers()),
        body=message.body,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
    )
    await _record(letter, pipeline)
    return _result(Outcome.DEAD, message, reason=reason, error=f"{error_type}: {error_message}")


async def _dead_undecoded(
    delivery: Delivery,
    consumer: Consumer[Any],
    pipeline: Pipeline,
    reason: DeadReason,
    exc: BaseException,
) -> Result:
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
    await _record(letter, pipeline)
    return Result(
        outcome=Outcome.DEAD,
        message_id=message_id,
        topic=delivery.type,
        attempt=1,
        reason=reason,
        error=f"{error_type}: {error_message}",
    )


async def _record(letter: DeadLetter, pipeline: Pipeline) -> None:
    async with pipeline.sessions() as session, session.begin():
        await deadletters.record(session, letter, schema=pipeline.schema)
    log.warning(
        "message.dead_lettered",
        message_id=letter.message_id,
        consumer=letter.consumer,
        topic=letter.topic,
        attempt=letter.attempts,
        reason=letter.reason.value,
        error_type=letter.error_type,
    )


async def record_broker_dead_letter(
    delivery: Delivery, consumer: Consumer[Any], pipeline: Pipeline
) -> Result:
    """Record a message the broker dead-lettered after its delivery limit.

    Such a message crashed or stalled workers repeatedly. If its effect did commit (the
    worker died after commit, before ack) it is not a dead letter: it was applied.
    """
    try:
        message: Message | None = delivery.decode()
    except DecodeError:
        message = None
    if message is not None:
        async with pipeline.sessions() as session:
            applied = await inbox.seen(
                session,
                schema=pipeline.schema,
                consumer=consumer.name,
                message_id=message.message_id,
            )
        if applied:
            return _result(Outcome.DUPLICATE, message)
    count = _delivery_count(delivery.headers)
    error = DeliveryLimitExceededError(
        f"the broker dead-lettered the message after {count or 'too many'} deliveries "
        "(workers crashed or stalled while handling it)"
    )
    if message is None:
        return await _dead_undecoded(delivery, consumer, pipeline, DeadReason.DELIVERY_LIMIT, error)
    return await _dead(message, consumer, pipeline, DeadReason.DELIVERY_LIMIT, error)


def _delivery_count(headers: Any) -> int | None:
    deaths = headers.get("x-death") if hasattr(headers, "get") else None
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        count = deaths[0].get("count")
        if isinstance(count, int):
            return count
    return None


def _result(outcome: Outcome, message: Message, **extra: Any) -> Result:
    return Result(
        outcome=outcome,
        message_id=str(message.message_id),
        topic=message.topic,
        attempt=message.attempt,
        **extra,
    )


def _summary(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
