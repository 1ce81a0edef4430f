"""The worker: consume every consumer's queue and map dispatch outcomes to AMQP acks.

Contract (DESIGN.md decision 7): ack only after the outcome is committed; when an
outcome cannot be recorded (database away) or the worker is stopping, requeue, never
drop and never dead-letter. On SIGTERM: stop taking messages, give in-flight handlers
``shutdown_timeout`` seconds, requeue what did not finish, close, return.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from tenacity import AsyncRetrying, retry_if_exception, wait_random_exponential

from postroom import faults, rabbit
from postroom.dispatch import (
    Pipeline,
    dispatch,
    dispatch_batch,
    record_broker_dead_letter,
)
from postroom.failures import Outcome, Result
from postroom.message import Delivery
from postroom.outage import is_outage
from postroom.outbox import Outbox
from postroom.router import Consumer, Router
from postroom.settings import Settings, redact_url

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

    from postroom.metrics import DeliveryLatency

log = structlog.get_logger("postroom.worker")


class Metrics(Protocol):
    """What the worker reports; :class:`postroom.metrics.Metrics` implements it."""

    def handled(self, *, consumer: str, topic: str, outcome: str, seconds: float) -> None: ...

    def inflight(self, consumer: str) -> contextlib.AbstractContextManager[None]: ...

    def connected(self, *, component: str, peer: str, up: bool) -> None: ...

    def latency(self, consumers: Mapping[str, Iterable[str]]) -> DeliveryLatency: ...


class _Outage(Exception):
    """A handler could not record an outcome: pause, reconnect, resume."""


@dataclass
class WorkerStats:
    """Counters for tests and health checks; never reset while running."""

    outcomes: dict[str, int] = field(default_factory=dict)
    requeued: int = 0
    reconnects: int = 0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class Worker:
    """Run a router's consumers until told to stop; reconnects by itself."""

    def __init__(
        self,
        settings: Settings,
        router: Router,
        *,
        metrics: Metrics | None = None,
        name: str = "postroom-worker",
    ) -> None:
        if not len(router):
            raise ValueError("the router has no consumers")
        self._settings = settings
        self._router = router
        self._metrics = metrics
        self._latency = metrics.latency({c.name: c.topics for c in router}) if metrics else None
        self._name = name
        self._semaphore = asyncio.Semaphore(settings.worker_concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._key_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._broken = asyncio.Event()
        self._stopping = False
        self._consuming = False
        self._connection: Any = None
        self._queues: list[tuple[Any, str]] = []
        self._batches: dict[str, list[AbstractIncomingMessage]] = {}
        self._takers: set[str] = set()
        self.stats = WorkerStats()

    @property
    def ready(self) -> bool:
        """True while consuming with both the database and the broker reachable."""
        return self._consuming and not self._broken.is_set() and not self._stopping

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until *stop* is set, then drain within ``shutdown_timeout`` and return."""
        settings = self._settings
        engine = settings.database.engine(
            application_name=self._name,
            pool_size=settings.worker_concurrency + 2,
            max_overflow=4,
            # No ping per checkout (a round trip per message): a dead connection fails
            # the dispatch, the message is requeued and the worker reconnects.
            pool_pre_ping=False,
        )
        pipeline = Pipeline(
            sessions=async_sessionmaker(engine, expire_on_commit=False),
            outbox=Outbox.from_settings(settings),
            max_body_bytes=settings.max_body_bytes,
            crash_at=settings.crash_at,
        )
        loop = asyncio.get_running_loop()
        short_sessions = 0
        try:
            while not stop.is_set():
                started = loop.time()
                try:
                    await self._wait_until_reachable(engine, stop)
                    if stop.is_set():
                        break
                    await self._consume(pipeline, stop)
                except Exception as exc:
                    if not _is_outage(exc):
                        raise
                    self.stats.reconnects += 1
                    log.warning("worker.outage", error=f"{type(exc).__name__}: {exc}"[:300])
                finally:
                    await self._close(stop.is_set())
                # A link that connects and drops at once (a flapping network, a proxy cutting
                # every connection) must not be reconnected in a tight loop: every cycle
                # returns the prefetched messages, and the broker counts each return
                # towards x-delivery-limit, so healthy messages would become dead letters.
                short_sessions = short_sessions + 1 if loop.time() - started < 10 else 0
                if short_sessions and not stop.is_set():
                    pause = min(5.0, 0.25 * 2**short_sessions) * (0.5 + random.random() / 2)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
        finally:
            await engine.dispose()

    async def _wait_until_reachable(self, engine: AsyncEngine, stop: asyncio.Event) -> None:
        """Block (with capped, jittered backoff) until the database and broker answer."""
        settings = self._settings

        async def sleep(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: _is_outage(exc) and not stop.is_set()),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            sleep=sleep,
            reraise=True,
            before_sleep=lambda state: log.warning(
                "worker.waiting_for_dependencies", attempt=state.attempt_number
            ),
        )
        async for attempt in retrying:
            with attempt:
                async with engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
                self._set_connected("database", True)
                log.info(
                    "worker.connecting",
                    amqp=redact_url(settings.amqp_url.get_secret_value()),
                    database=redact_url(settings.asyncpg_dsn),
                )
                self._connection = await rabbit.connect(settings.broker, name=self._name)

    async def _consume(self, pipeline: Pipeline, stop: asyncio.Event) -> None:
        settings = self._settings
        connection = self._connection
        self._broken.clear()
        connection.close_callbacks.add(lambda *_: self._broken.set())
        await rabbit.declare_queues(
            connection,
            exchange=settings.exchange,
            dead_letter_exchange=settings.dead_letter_exchange,
            queues=[_queue_spec(c, settings.delivery_limit) for c in self._router],
        )
        for consumer in self._router:
            channel = await connection.channel(publisher_confirms=False)
            channel.close_callbacks.add(lambda *_: self._broken.set())
            await channel.set_qos(prefetch_count=settings.worker_prefetch)
            live = await channel.get_queue(consumer.name, ensure=False)
            tag = await live.consume(self._callback(consumer, pipeline, dead=False))
            if not consumer.ordered:
                # An ordered (single-active-consumer) queue is never cancelled: a cancel
                # hands it to the next consumer while our unacked messages are still out,
                # and those would then overtake them. Closing the channel returns them
                # first (see _requeue).
                self._queues.append((live, tag))
            dead = await channel.get_queue(f"{consumer.name}.dead", ensure=False)
            tag = await dead.consume(self._callback(consumer, pipeline, dead=True))
            self._queues.append((dead, tag))
        self._consuming = True
        self._set_connected("broker", True)
        log.info("worker.consuming", consumers=[c.name for c in self._router])
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._broken.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if not stop.is_set():
            raise _Outage("the broker connection or a channel closed, or the database is away")

    def _callback(
        self, consumer: Consumer[Any], pipeline: Pipeline, *, dead: bool
    ) -> Callable[[AbstractIncomingMessage], Coroutine[Any, Any, None]]:
        batched = self._settings.worker_batch_size > 1 and not consumer.ordered and not dead

        async def on_message(incoming: AbstractIncomingMessage) -> None:
            # Our own task, not aiormq's: a closing channel must not cancel a handler
            # midway; the drain decides what finishes and what is requeued.
            if batched:
                self._add_to_batch(consumer, incoming, pipeline)
            else:
                self._spawn(self._handle(consumer, incoming, pipeline, dead=dead))

        return on_message

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _add_to_batch(
        self, consumer: Consumer[Any], incoming: AbstractIncomingMessage, pipeline: Pipeline
    ) -> None:
        """Queue *incoming* for the next batch of its consumer.

        Natural batching: a batch is what has arrived by the time a handler slot is free
        (at most ``worker_batch_size``). An idle worker thus handles a lone message at
        once, and a busy one commits many per transaction, with no timer in the way.
        """
        self._batches.setdefault(consumer.name, []).append(incoming)
        if consumer.name not in self._takers:  # one taker at a time waits for a slot
            self._takers.add(consumer.name)
            self._spawn(self._take_batch(consumer, pipeline))

    async def _take_batch(self, consumer: Consumer[Any], pipeline: Pipeline) -> None:
        settings = self._settings
        if settings.worker_batch_wait and not self._stopping:
            await asyncio.sleep(settings.worker_batch_wait)  # linger: let the batch fill up
        async with self._semaphore:
            self._takers.discard(consumer.name)
            waiting = self._batches.get(consumer.name, [])
            batch = waiting[: settings.worker_batch_size]
            del waiting[: len(batch)]
            if waiting:  # more than a batch arrived: the next taker queues for a slot now
                self._takers.add(consumer.name)
                self._spawn(self._take_batch(consumer, pipeline))
            if batch:
                await self._handle_batch(consumer, batch, pipeline)

    async def _handle_batch(
        self,
        consumer: Consumer[Any],
        batch: list[AbstractIncomingMessage],
        pipeline: Pipeline,
    ) -> None:
        """Dispatch one batch (the caller holds a handler slot); ack after the commit."""
        if self._stopping or self._broken.is_set():
            for incoming in batch:
                await self._requeue(incoming, consumer, "not started: stopping or reconnecting")
            return
        started = time.perf_counter()
        inflight = self._metrics.inflight(consumer.name) if self._metrics else None
        try:
            with inflight or contextlib.nullcontext():
                results = await dispatch_batch([_delivery(m) for m in batch], consumer, pipeline)
        except asyncio.CancelledError:
            for incoming in batch:
                await asyncio.shield(self._requeue(incoming, consumer, "cancelled at shutdown"))
            raise
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"[:300]
            for incoming in batch:
                await self._requeue(incoming, consumer, why)
            self._set_connected("database", False)
            self._broken.set()
            return
        faults.crash_point(pipeline.crash_at, faults.WORKER_AFTER_COMMIT)
        seconds = (time.perf_counter() - started) / len(batch)
        for incoming, result in zip(batch, results, strict=True):
            await self._ack(incoming, consumer, result, seconds)

    async def _handle(
        self,
        consumer: Consumer[Any],
        incoming: AbstractIncomingMessage,
        pipeline: Pipeline,
        *,
        dead: bool,
    ) -> None:
        key = incoming.headers.get("postroom-key") if consumer.ordered and not dead else None
        lock = self._key_lock(consumer.name, str(key)) if key is not None else None
        async with lock or contextlib.nullcontext(), self._semaphore:
            if self._stopping or self._broken.is_set():
                await self._requeue(
                    incoming, consumer, "not started: worker stopping or reconnecting"
                )
                return
            delivery = _delivery(incoming)
            started = time.perf_counter()
            inflight = self._metrics.inflight(consumer.name) if self._metrics else None
            try:
                with inflight or contextlib.nullcontext():
                    if dead:
                        result = await record_broker_dead_letter(delivery, consumer, pipeline)
                    else:
                        result = await dispatch(delivery, consumer, pipeline)
            except asyncio.CancelledError:
                await asyncio.shield(self._requeue(incoming, consumer, "cancelled at shutdown"))
                raise
            except Exception as exc:
                # No outcome could be recorded: the database is away. Requeue and pause.
                await self._requeue(incoming, consumer, f"{type(exc).__name__}: {exc}"[:300])
                self._set_connected("database", False)
                self._broken.set()
                return
            finally:
                if lock is not None and not lock._waiters:
                    self._key_locks.pop((consumer.name, str(key)), None)
            faults.crash_point(pipeline.crash_at, faults.WORKER_AFTER_COMMIT)
            await self._ack(incoming, consumer, result, time.perf_counter() - started)

    def _key_lock(self, consumer: str, key: str) -> asyncio.Lock:
        return self._key_locks.setdefault((consumer, key), asyncio.Lock())

    async def _ack(
        self,
        incoming: AbstractIncomingMessage,
        consumer: Consumer[Any],
        result: Result,
        seconds: float,
    ) -> None:
        try:
            await incoming.ack()
        except Exception as exc:  # the channel died after commit: redelivery finds the inbox row
            log.warning(
                "message.ack_failed",
                message_id=result.message_id,
                consumer=consumer.name,
                error=f"{type(exc).__name__}: {exc}"[:200],
            )
            self._broken.set()
            return
        self.stats.count(result.outcome.value)
        if self._metrics is not None:
            self._metrics.handled(
                consumer=consumer.name,
                topic=result.topic or "unknown",
                outcome=result.outcome.value,
                seconds=seconds,
            )
        if self._latency is not None:
            self._latency.observe(consumer.name, result)
        # Successes at DEBUG: a JSON line per message cost ~10% of a worker's CPU, and the
        # metrics count them; failures were logged when their outcome was written.
        quiet = result.outcome in (Outcome.ACKED, Outcome.DUPLICATE)
        (log.debug if quiet else log.warning)(
            "message.handled",
            message_id=result.message_id,
            consumer=consumer.name,
            topic=result.topic,
            attempt=result.attempt,
            outcome=result.outcome.value,
            reason=result.reason.value if result.reason else None,
            seconds=round(seconds, 4),
        )

    async def _requeue(
        self, incoming: AbstractIncomingMessage, consumer: Consumer[Any], why: str
    ) -> None:
        self.stats.requeued += 1
        log.info(
            "message.requeued",
            message_id=incoming.message_id,
            consumer=consumer.name,
            reason=why,
        )
        if consumer.ordered:
            # Left unacked on purpose: we only requeue when the channel is about to close,
            # and a closing channel returns all its unacked messages at once, in delivery
            # order, ahead of the queue, before the next active consumer starts. A message
            # rejected alone would be delivered again behind those that followed it.
            return
        with contextlib.suppress(Exception):  # a closed channel requeues by itself
            await incoming.reject(requeue=True)

    async def _close(self, stopping: bool) -> None:
        """Stop consuming, drain in-flight handlers (bounded), then close the connection."""
        self._stopping = stopping
        self._consuming = False
        for queue, tag in self._queues:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(queue.cancel(tag), timeout=2)
        self._queues.clear()
        if self._inflight:
            deadline = self._settings.shutdown_timeout if stopping else 2.0
            log.info("worker.draining", inflight=len(self._inflight), deadline_seconds=deadline)
            _done, pending = await asyncio.wait(set(self._inflight), timeout=deadline)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
                log.warning("worker.drain_deadline", requeued=len(pending))
        # Whatever still waits for a batch came on the closed channel: the broker has it back.
        self._batches.clear()
        self._takers.clear()
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=5)
        self._set_connected("broker", False)

    def _set_connected(self, peer: str, up: bool) -> None:
        if self._metrics is not None:
            self._metrics.connected(component="worker", peer=peer, up=up)


def _queue_spec(consumer: Consumer[Any], delivery_limit: int) -> rabbit.QueueSpec:
    return rabbit.QueueSpec(
        name=consumer.name,
        topics=consumer.topics,
        delivery_limit=delivery_limit,
        single_active_consumer=consumer.ordered,
    )


def _delivery(incoming: AbstractIncomingMessage) -> Delivery:
    return Delivery(
        body=incoming.body,
        message_id=incoming.message_id,
        type=incoming.type,
        timestamp=incoming.timestamp,
        content_type=incoming.content_type,
        correlation_id=incoming.correlation_id,
        headers=dict(incoming.headers or {}),
        redelivered=bool(incoming.redelivered),
    )


def _is_outage(exc: BaseException) -> bool:
    return isinstance(exc, _Outage) or is_outage(exc)


async def work_forever(
    settings: Settings, router: Router, stop: asyncio.Event, *, metrics: Metrics | None = None
) -> None:
    """Run one worker until *stop* is set (the `postroom worker` command's body)."""
    await Worker(settings, router, metrics=metrics).run(stop)
