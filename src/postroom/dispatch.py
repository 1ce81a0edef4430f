"""Handle one delivery for one consumer: message in, outcome out, no broker involved.

The pipeline is fixed, not a stack of optional middleware: size check, decode, then one
transaction holding the inbox row, the handler's writes and the events it publishes.
A failure either schedules a retry (an outbox row for this consumer's queue only, due
after a backoff) or records a dead letter, in a transaction of its own. The worker maps
the outcome to an AMQP ack; the testing helpers call this very function.

Anything raised out of :func:`dispatch` means the pipeline could not record an outcome:
the database is away, postroom's schema is missing, or a bug (the caller tells which with
:mod:`postroom.outage`); the caller must requeue the message, never drop it. A handler's
own exception is never raised: it is the handler's, and becomes a retry or a dead letter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from postroom import faults, inbox, lanes, tracing
from postroom.deadletters import DeadReason
from postroom.errors import DecodeError, DeliveryLimitExceededError, UnknownTopicError
from postroom.events import Event
from postroom.failures import (
    Failure,
    Outcome,
    Result,
    dead,
    judge,
    log_failure,
    result_of,
    undecodable,
    write,
)
from postroom.lanes import Lane
from postroom.message import Delivery, Message
from postroom.outage import is_outage
from postroom.outbox import Outbox
from postroom.router import BatchContext, Consumer, Context


@dataclass(frozen=True, slots=True)
class Pipeline:
    """The collaborators dispatch needs; built once per worker.

    A delivery's transaction runs on a connection of ``sessions``' engine, a worker's
    lane (:mod:`postroom.lanes`) or one borrowed for the call; an ORM session is made
    from ``sessions`` only if the handler touches ``ctx.session``.
    """

    sessions: async_sessionmaker[AsyncSession]
    outbox: Outbox
    max_body_bytes: int
    crash_at: str | None = None
    engine: AsyncEngine = field(init=False)

    def __post_init__(self) -> None:
        bind = self.sessions.kw.get("bind")
        if not isinstance(bind, AsyncEngine):
            raise TypeError(
                "Pipeline needs sessions bound to an AsyncEngine: async_sessionmaker(engine)"
            )
        object.__setattr__(self, "engine", bind)

    @property
    def schema(self) -> str:
        return self.outbox.schema


@dataclass(frozen=True, slots=True)
class _Decoded:
    message: Message
    event: Event


async def dispatch(
    delivery: Delivery, consumer: Consumer[Any], pipeline: Pipeline, *, lane: Lane | None = None
) -> Result:
    """Run *delivery* through *consumer*'s pipeline and return the outcome.

    Guarantees: the handler's writes commit at most once per (consumer, message id);
    a failure is retried or dead-lettered durably before this returns. Raises only when
    no outcome could be recorded; then nothing was committed and the message must be
    requeued. The transaction runs on *lane* (a worker's handler slot), else on a
    connection of the pipeline's engine borrowed for this call.
    """
    decoded = _decode(delivery, consumer, pipeline)
    if isinstance(decoded, Failure):
        return await _settle_alone(decoded, consumer, pipeline)
    if lane is None:
        async with lanes.borrowed(pipeline.engine) as borrowed:
            return await _transact(borrowed, decoded, consumer, pipeline)
    return await _transact(lane, decoded, consumer, pipeline)


async def _transact(
    lane: Lane, decoded: _Decoded, consumer: Consumer[Any], pipeline: Pipeline
) -> Result:
    """One transaction on *lane*: the inbox claim, the handler, commit (see postroom.lanes)."""
    message = decoded.message
    claimed = False
    try:
        connection = await lane.open()
        await lane.begin()
        claimed = await inbox.claim(
            lane.driver,
            schema=pipeline.schema,
            consumer=consumer.name,
            message_id=message.message_id,
        )
        if not claimed:
            await lane.commit()  # nothing written: ends the transaction (or chains one)
            return result_of(Outcome.DUPLICATE, message)
        bookkeeping = lane.bookkeeping()
        try:
            await _run_handler(connection, decoded, consumer, pipeline)
        finally:
            bookkeeping.close()
        await lane.commit()
    except BaseException as exc:
        await lane.abandon(exc)
        if not claimed or is_outage(exc) or not isinstance(exc, Exception):
            # Not the handler failing: postroom's own inbox step failed, or our transaction
            # lost its connection, so nothing is known (even COMMIT may have happened).
            # Raise, so the worker requeues; a retry here would burn an attempt and step
            # out of key order for a database blip.
            raise
        return await _settle_alone(judge(message, consumer, exc), consumer, pipeline)
    return result_of(Outcome.ACKED, message)


async def dispatch_batch(
    deliveries: Sequence[Delivery], consumer: Consumer[Any], pipeline: Pipeline
) -> list[Result]:
    """Run several deliveries in ONE transaction and commit them together.

    Same guarantees as :func:`dispatch`, one commit for the lot: the batch's inbox rows
    are claimed in one statement and the handlers run one after the other. If a handler
    fails (a poison message, a deadlock between batches), that transaction is rolled
    back whole and each delivery goes through :func:`dispatch`, in a transaction of its
    own, so one failure does not spoil the batch. Handlers before the failing one thus
    ran twice, their first writes rolled back: at-least-once, as after any crash.

    Why not a SAVEPOINT per message: two more round trips per message (batched was 1.3x
    the per-message figure with them, 2.35x without), and a batch holding many rows'
    locks through a chain of savepoints turned lock-order conflicts between concurrent
    batches into a deadlock per message (the batched fault scenario stalled on it).
    Raises (requeue them all; what did commit is found in the inbox on redelivery) only
    when the database is lost.
    """
    items = [_decode(delivery, consumer, pipeline) for delivery in deliveries]
    try:
        return await _run_batch(items, consumer, pipeline)
    except _HandlerFailed:
        return [await dispatch(delivery, consumer, pipeline) for delivery in deliveries]


class _HandlerFailed(Exception):
    """A handler of a batch failed: roll the batch back, dispatch one by one."""


async def _run_batch(
    items: list[_Decoded | Failure], consumer: Consumer[Any], pipeline: Pipeline
) -> list[Result]:
    results: list[Result] = []
    failures: list[Failure] = []
    claimed = False
    try:
        async with pipeline.engine.connect() as connection, connection.begin():
            fresh = await inbox.claim_many(
                connection,
                schema=pipeline.schema,
                consumer=consumer.name,
                message_ids=[i.message.message_id for i in items if isinstance(i, _Decoded)],
            )
            claimed = True
            admitted = await _admit(connection, items, fresh, consumer, pipeline, results, failures)
            run = _run_batch_handler if consumer.batch_handler is not None else _run_items
            await run(connection, admitted, consumer, pipeline)
    except _HandlerFailed:
        raise
    except Exception as exc:
        if not claimed or is_outage(exc):
            raise
        raise _HandlerFailed from exc  # COMMIT refused the handlers' writes
    for failure in failures:
        log_failure(failure, consumer)
    return results


async def _admit(
    connection: AsyncConnection,
    items: list[_Decoded | Failure],
    fresh: set[Any],
    consumer: Consumer[Any],
    pipeline: Pipeline,
    results: list[Result],
    failures: list[Failure],
) -> list[_Decoded]:
    """Sort a claimed batch: return the messages its handler must see, in order.

    Duplicates (processed before, or twice in the batch) are answered; failures (not
    decodable, unknown topic, too large) are written in the batch's transaction. *results*
    gets one entry per item, aligned with *items*: ``acked`` for the admitted ones, which
    stands once their handler returned and the batch committed.
    """
    admitted: list[_Decoded] = []
    for item in items:
        if isinstance(item, _Decoded):
            if item.message.message_id not in fresh:
                results.append(result_of(Outcome.DUPLICATE, item.message))
                continue
            fresh.discard(item.message.message_id)
            admitted.append(item)
            results.append(result_of(Outcome.ACKED, item.message))
            continue
        async with pipeline.sessions(bind=connection) as session:
            session.sync_session.begin()  # join the batch's transaction
            await write(session, item, consumer, pipeline.outbox)
        failures.append(item)
        results.append(item.result)
    return admitted


async def _run_items(
    connection: AsyncConnection,
    admitted: list[_Decoded],
    consumer: Consumer[Any],
    pipeline: Pipeline,
) -> None:
    """Per-event handlers: one call per admitted message, all in the batch's transaction."""
    for item in admitted:
        try:
            await _run_handler(connection, item, consumer, pipeline)
        except Exception as exc:
            if is_outage(exc):
                raise
            raise _HandlerFailed from exc


async def _run_batch_handler(
    connection: AsyncConnection,
    accepted: list[_Decoded],
    consumer: Consumer[Any],
    pipeline: Pipeline,
) -> None:
    """A ``batch=True`` consumer: ONE handler call for the admitted messages."""
    if not accepted:
        return
    assert consumer.batch_handler is not None
    messages = [item.message for item in accepted]
    transaction = Context(
        connection=connection,
        message=messages[0],
        consumer=consumer.name,
        outbox=pipeline.outbox,
        sessions=pipeline.sessions,
    )
    try:
        faults.crash_point(pipeline.crash_at, faults.WORKER_IN_HANDLER)
        with tracing.processing_batch(consumer=consumer.name, messages=messages):
            await consumer.batch_handler(
                [item.event for item in accepted], BatchContext(transaction, messages)
            )
            await transaction.flush()
    except Exception as exc:
        if is_outage(exc):
            raise
        raise _HandlerFailed from exc
    finally:
        await transaction.release()


def _decode(delivery: Delivery, consumer: Consumer[Any], pipeline: Pipeline) -> _Decoded | Failure:
    """Check size, envelope, topic and payload; no I/O, so it runs before any transaction."""
    if len(delivery.body) > pipeline.max_body_bytes:
        error = DecodeError(
            f"body is {len(delivery.body)} bytes; the limit is {pipeline.max_body_bytes}"
        )
        return undecodable(delivery, consumer, DeadReason.TOO_LARGE, error)
    try:
        message = delivery.decode()
    except DecodeError as exc:
        return undecodable(delivery, consumer, DeadReason.UNDECODABLE, exc)
    if message.topic not in consumer.topics:
        handled = ", ".join(consumer.topics)
        error = UnknownTopicError(
            f"consumer {consumer.name!r} handles {handled}, not {message.topic!r}"
        )
        return dead(message, consumer, DeadReason.UNKNOWN_TOPIC, error)
    try:
        event = consumer.event_type.model_validate_json(message.body)
    except ValidationError as exc:
        error = DecodeError(
            f"payload does not match {consumer.event_type.__name__}: {_summary(exc)}"
        )
        return dead(message, consumer, DeadReason.UNDECODABLE, error)
    return _Decoded(message, event)


async def _run_handler(
    connection: AsyncConnection, decoded: _Decoded, consumer: Consumer[Any], pipeline: Pipeline
) -> None:
    context = Context(
        connection=connection,
        message=decoded.message,
        consumer=consumer.name,
        outbox=pipeline.outbox,
        sessions=pipeline.sessions,
    )
    message = decoded.message
    try:
        faults.crash_point(pipeline.crash_at, faults.WORKER_IN_HANDLER)
        with tracing.processing(
            consumer=consumer.name,
            message_id=str(message.message_id),
            topic=message.topic,
            traceparent=message.traceparent,
            attempt=message.attempt,
        ):
            await consumer.handler(decoded.event, context)
            await context.flush()
    finally:
        await context.release()


async def _settle_alone(failure: Failure, consumer: Consumer[Any], pipeline: Pipeline) -> Result:
    async with pipeline.sessions() as session, session.begin():
        await write(session, failure, consumer, pipeline.outbox)
    point = (
        faults.WORKER_AFTER_RETRY_COMMIT
        if failure.retry
        else faults.WORKER_AFTER_DEAD_LETTER_COMMIT
    )
    faults.crash_point(pipeline.crash_at, point)
    log_failure(failure, consumer)
    return failure.result


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
            return result_of(Outcome.DUPLICATE, message)
    count = _delivery_count(delivery.headers)
    error = DeliveryLimitExceededError(
        f"the broker dead-lettered the message after {count or 'too many'} deliveries "
        "(workers crashed or stalled while handling it)"
    )
    if message is None:
        failure = undecodable(delivery, consumer, DeadReason.DELIVERY_LIMIT, error)
    else:
        failure = dead(message, consumer, DeadReason.DELIVERY_LIMIT, error)
    return await _settle_alone(failure, consumer, pipeline)


def _delivery_count(headers: Any) -> int | None:
    deaths = headers.get("x-death") if hasattr(headers, "get") else None
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        count = deaths[0].get("count")
        if isinstance(count, int):
            return count
    return None


def _summary(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
