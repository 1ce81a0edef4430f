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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postroom import deadletters, faults, inbox
from postroom.deadletters import DeadLetter, DeadReason
from postroom.errors import DecodeError, DeliveryLimitExceededError, Reject, UnknownTopicError
from postroom.events import Event
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


@dataclass(frozen=True, slots=True)
class _Failure:
    """A failed delivery's outcome, to be written in some transaction: a retry or a letter."""

    result: Result
    letter: DeadLetter | None = None
    retry: Message | None = None
    delay: timedelta | None = None


@dataclass(frozen=True, slots=True)
class _Decoded:
    message: Message
    event: Event


async def dispatch(delivery: Delivery, consumer: Consumer[Any], pipeline: Pipeline) -> Result:
    """Run *delivery* through *consumer*'s pipeline and return the outcome.

    Guarantees: the handler's writes commit at most once per (consumer, message id);
    a failure is retried or dead-lettered durably before this returns. Raises only when
    no outcome could be recorded; then nothing was committed and the message must be
    requeued.
    """
    decoded = _decode(delivery, consumer, pipeline)
    if isinstance(decoded, _Failure):
        return await _settle_alone(decoded, consumer, pipeline)
    message = decoded.message
    try:
        async with pipeline.sessions() as session, session.begin():
            if not await _claim(session, message, consumer, pipeline):
                return _result(Outcome.DUPLICATE, message)
            await _run_handler(session, decoded, consumer, pipeline)
    except Exception as exc:
        if _database_lost(exc):
            # Not the handler failing: our transaction lost its connection, so nothing is
            # known (even COMMIT may have happened). Raise, so the worker requeues; a retry
            # here would burn an attempt and step out of key order for a database blip.
            raise
        return await _settle_alone(_failure(message, consumer, exc), consumer, pipeline)
    return _result(Outcome.ACKED, message)


async def dispatch_batch(
    deliveries: Sequence[Delivery], consumer: Consumer[Any], pipeline: Pipeline
) -> list[Result]:
    """Run several deliveries in ONE transaction and commit them together.

    Same guarantees as :func:`dispatch`, one commit for the lot. The inbox rows of the
    batch are claimed in one statement; handlers first run one after the other with no
    savepoint (a SAVEPOINT and its RELEASE are two round trips and most of a batched
    message's client CPU). If a handler fails, that attempt is rolled back whole and the
    batch runs again with each handler in its own SAVEPOINT: the failing one rolls back
    to it, gives up its claim and gets its retry or dead letter in the same transaction,
    so one poison message does not spoil the batch. Handlers before it thus ran twice,
    their first writes rolled back: at-least-once, as after any crash. Raises (nothing
    committed, requeue them all) only when the transaction itself fails.
    """
    items = [_decode(delivery, consumer, pipeline) for delivery in deliveries]
    try:
        return await _run_batch(items, consumer, pipeline, isolate=False)
    except _HandlerFailed:
        return await _run_batch(items, consumer, pipeline, isolate=True)


class _HandlerFailed(Exception):
    """A handler failed in a batch run without savepoints: run it again with them."""


async def _run_batch(
    items: list[_Decoded | _Failure], consumer: Consumer[Any], pipeline: Pipeline, *, isolate: bool
) -> list[Result]:
    results: list[Result] = []
    failures: list[_Failure] = []
    async with pipeline.sessions() as session, session.begin():
        fresh = await inbox.claim_many(
            session,
            schema=pipeline.schema,
            consumer=consumer.name,
            message_ids=[i.message.message_id for i in items if isinstance(i, _Decoded)],
        )
        for item in items:
            if isinstance(item, _Decoded):
                message = item.message
                if message.message_id not in fresh:  # processed before, or twice in the batch
                    results.append(_result(Outcome.DUPLICATE, message))
                    continue
                fresh.discard(message.message_id)
                failure = await _run_batched_handler(session, item, consumer, pipeline, isolate)
                if failure is None:
                    results.append(_result(Outcome.ACKED, message))
                    continue
                item = failure
            await _write(session, item, consumer, pipeline)
            failures.append(item)
            results.append(item.result)
    for failure in failures:
        _log_failure(failure, consumer)
    return results


async def _run_batched_handler(
    session: AsyncSession,
    decoded: _Decoded,
    consumer: Consumer[Any],
    pipeline: Pipeline,
    isolate: bool,
) -> _Failure | None:
    """Run one handler of a batch; when isolated, a failure undoes its writes and claim."""
    try:
        if not isolate:
            await _run_handler(session, decoded, consumer, pipeline)
            return None
        async with session.begin_nested():
            await _run_handler(session, decoded, consumer, pipeline)
    except Exception as exc:
        if _database_lost(exc):
            raise
        if not isolate:
            raise _HandlerFailed from exc
        await inbox.unclaim(
            session,
            schema=pipeline.schema,
            consumer=consumer.name,
            message_id=decoded.message.message_id,
        )
        return _failure(decoded.message, consumer, exc)
    return None


def _decode(delivery: Delivery, consumer: Consumer[Any], pipeline: Pipeline) -> _Decoded | _Failure:
    """Check size, envelope, topic and payload; no I/O, so it runs before any transaction."""
    if len(delivery.body) > pipeline.max_body_bytes:
        error = DecodeError(
            f"body is {len(delivery.body)} bytes; the limit is {pipeline.max_body_bytes}"
        )
        return _undecoded(delivery, consumer, DeadReason.TOO_LARGE, error)
    try:
        message = delivery.decode()
    except DecodeError as exc:
        return _undecoded(delivery, consumer, DeadReason.UNDECODABLE, exc)
    if message.topic not in consumer.topics:
        handled = ", ".join(consumer.topics)
        error = UnknownTopicError(
            f"consumer {consumer.name!r} handles {handled}, not {message.topic!r}"
        )
        return _dead(message, consumer, DeadReason.UNKNOWN_TOPIC, error)
    try:
        event = consumer.event_type.model_validate_json(message.body)
    except ValidationError as exc:
        error = DecodeError(
            f"payload does not match {consumer.event_type.__name__}: {_summary(exc)}"
        )
        return _dead(message, consumer, DeadReason.UNDECODABLE, error)
    return _Decoded(message, event)


async def _claim(
    session: AsyncSession, message: Message, consumer: Consumer[Any], pipeline: Pipeline
) -> bool:
    return await inbox.claim(
        session, schema=pipeline.schema, consumer=consumer.name, message_id=message.message_id
    )


async def _run_handler(
    session: AsyncSession, decoded: _Decoded, consumer: Consumer[Any], pipeline: Pipeline
) -> None:
    context = Context(
        session=session, message=decoded.message, consumer=consumer.name, outbox=pipeline.outbox
    )
    faults.crash_point(pipeline.crash_at, faults.WORKER_IN_HANDLER)
    await consumer.handler(decoded.event, context)


def _failure(message: Message, consumer: Consumer[Any], exc: Exception) -> _Failure:
    """Decide what a handler's exception means: dead now, dead at last, or retry later."""
    if isinstance(exc, Reject):
        return _dead(message, consumer, DeadReason.REJECTED, exc)
    if message.attempt >= consumer.retry.max_attempts:
        return _dead(message, consumer, DeadReason.EXHAUSTED, exc)
    error_type, error_message, _ = deadletters.describe(exc)
    first_failed = message.extra_headers.get(H_FIRST_FAILED) or datetime.now(UTC).isoformat()
    retry = message.next_attempt(
        **{
            H_CONSUMER: consumer.name,
            H_FIRST_FAILED: first_failed,
            H_LAST_ERROR: f"{error_type}: {error_message}"[:500],
        }
    )
    return _Failure(
        result=_result(Outcome.RETRY, message, error=f"{error_type}: {error_message}"),
        retry=retry,
        delay=consumer.retry.delay(message.attempt),
    )


def _dead(
    message: Message, consumer: Consumer[Any], reason: DeadReason, exc: BaseException
) -> _Failure:
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
    result = _result(Outcome.DEAD, message, reason=reason, error=f"{error_type}: {error_message}")
    return _Failure(result=result, letter=letter)


def _undecoded(
    delivery: Delivery, consumer: Consumer[Any], reason: DeadReason, exc: BaseException
) -> _Failure:
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
    return _Failure(result=result, letter=letter)


async def _write(
    session: AsyncSession, failure: _Failure, consumer: Consumer[Any], pipeline: Pipeline
) -> None:
    """Write a failure's retry row or dead letter in the caller's transaction."""
    if failure.retry is not None:
        await pipeline.outbox.write(
            session,
            failure.retry,
            exchange=DEFAULT_EXCHANGE,
            routing_key=consumer.name,
            delay=failure.delay,
        )
    elif failure.letter is not None:
        await deadletters.record(session, failure.letter, schema=pipeline.schema)


async def _settle_alone(failure: _Failure, consumer: Consumer[Any], pipeline: Pipeline) -> Result:
    async with pipeline.sessions() as session, session.begin():
        await _write(session, failure, consumer, pipeline)
    point = (
        faults.WORKER_AFTER_RETRY_COMMIT
        if failure.retry
        else faults.WORKER_AFTER_DEAD_LETTER_COMMIT
    )
    faults.crash_point(pipeline.crash_at, point)
    _log_failure(failure, consumer)
    return failure.result


def _log_failure(failure: _Failure, consumer: Consumer[Any]) -> None:
    result = failure.result
    if failure.retry is not None:
        log.info(
            "message.retry_scheduled",
            message_id=result.message_id,
            consumer=consumer.name,
            topic=result.topic,
            attempt=result.attempt,
            retry_in_seconds=round(failure.delay.total_seconds(), 3) if failure.delay else 0,
            error=result.error,
        )
    else:
        log.warning(
            "message.dead_lettered",
            message_id=result.message_id,
            consumer=consumer.name,
            topic=result.topic,
            attempt=result.attempt,
            reason=result.reason.value if result.reason else None,
            error=result.error,
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
        failure = _undecoded(delivery, consumer, DeadReason.DELIVERY_LIMIT, error)
    else:
        failure = _dead(message, consumer, DeadReason.DELIVERY_LIMIT, error)
    return await _settle_alone(failure, consumer, pipeline)


def _delivery_count(headers: Any) -> int | None:
    deaths = headers.get("x-death") if hasattr(headers, "get") else None
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        count = deaths[0].get("count")
        if isinstance(count, int):
            return count
    return None


_DATABASE_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InternalClientError,
)


def _database_lost(exc: BaseException) -> bool:
    """Return True if *exc*, or an exception it chains, is a lost database connection.

    Narrower than ``outage.is_outage`` on purpose: a handler's own ``TimeoutError`` or
    ``OSError`` (a payment provider timing out) is a failed attempt to retry, while a
    transaction whose connection died (backend killed, server restarting, network cut)
    has no known outcome and must not count as one.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, _DATABASE_LOST):
            return True
        current = current.__cause__ or current.__context__
    return False


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
