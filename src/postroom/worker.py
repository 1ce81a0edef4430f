"""The worker: consume every consumer's queue and map dispatch outcomes to AMQP acks.

Contract (DESIGN.md decision 7): ack only after the outcome is committed; when an
outcome cannot be recorded (database away) or the worker is stopping, requeue, never
drop and never dead-letter. On SIGTERM: stop taking messages, give in-flight handlers
``shutdown_timeout`` seconds, requeue what did not finish, close, return.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from postroom import faults, outage, pauses, rabbit
from postroom.dispatch import (
    Pipeline,
    dispatch,
    dispatch_batch,
    record_broker_dead_letter,
)
from postroom.failures import Outcome, Result
from postroom.lanes import Lanes
from postroom.message import Delivery
from postroom.metrics import Metrics, WorkerStats
from postroom.outbox import Outbox
from postroom.router import Consumer, Router
from postroom.settings import Settings
from postroom.subscriber import Deliver, Subscriber

log = structlog.get_logger("postroom.worker")


DEAD_QUEUE_BUG_LIMIT = 5
"""Bugs met recording one message from a ``.dead`` queue before the worker holds it."""


@dataclass(slots=True)
class _Taken:
    """A delivery in hand: what dispatch sees, and how to settle it with the broker."""

    delivery: Delivery
    tag: int
    subscriber: Subscriber

    @property
    def message_id(self) -> str | None:
        return self.delivery.message_id


class KeyLocks:
    """One lock per (consumer, ordering key), dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, consumer: str, key: str) -> Any:
        name = (consumer, key)
        lock, users = self._locks.get(name) or (asyncio.Lock(), 0)
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


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
        self._metrics = metrics if metrics is not None else Metrics()
        self._latency = self._metrics.latency({c.name: c.topics for c in router})
        self._name = name
        self._lanes: Lanes  # the handler slots, each with its connection; made by run()
        self._inflight: set[asyncio.Task[None]] = set()
        self._key_locks = KeyLocks()
        self._broken = asyncio.Event()
        self._broken_by: BaseException | None = None
        self._stopping = False
        self._consuming = False
        self._connection: Any = None
        self._queues: list[tuple[Subscriber, str]] = []
        self._subscribers: list[Subscriber] = []
        self._batches: dict[str, list[_Taken]] = {}
        self._takers: set[str] = set()
        self._paused: set[str] = set()
        self._running: collections.Counter[str] = collections.Counter()
        self._by_name: dict[str, Subscriber] = {}
        self._unsettled = 0
        self._bug_streak = 0
        self._dead_bugs: dict[tuple[str, str], int] = {}
        self._recorders: dict[tuple[str, str, str], Callable[[float], None]] = {}
        self._debug = logging.getLogger("postroom.worker").isEnabledFor(logging.DEBUG)
        self._urls = {
            outage.DATABASE: settings.database.redacted,
            outage.BROKER: settings.broker.redacted,
        }
        self.stats = WorkerStats(self._metrics, [c.name for c in router])
        """Live counts, read from the metrics."""

    @property
    def ready(self) -> bool:
        """True while consuming with both the database and the broker reachable."""
        return self._consuming and not self._broken.is_set() and not self._stopping

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> None:
        """Consume until *stop* is set, then drain within ``shutdown_timeout`` and return.

        Outages (database or broker away) are waited out: in-flight messages go back to
        the broker and the worker reconnects with backoff, explaining each wait in the
        log. Raises :class:`~postroom.errors.ConfigError` when postroom's schema is
        missing or behind head (nothing is consumed further, nothing dead-lettered).

        *burst*: also return once every queue of the router is empty and nothing is in
        flight (for tests and one-shot jobs that wait for a state, not a time).
        """
        settings = self._settings
        engine = outage.reachable_engine(
            settings.database,
            url=self._urls[outage.DATABASE],
            application_name=self._name,
            # A lane per handler slot keeps one connection; a batch, a failure's own
            # transaction and the pause poll check out more beside them.
            pool_size=settings.worker_concurrency + 2,
            max_overflow=settings.worker_concurrency + 4,
            # No ping per checkout (a round trip per message): a dead connection fails
            # the dispatch, the message is requeued and the worker reconnects.
            pool_pre_ping=False,
        )
        self._lanes = Lanes(engine, settings.worker_concurrency)
        pipeline = Pipeline(
            sessions=async_sessionmaker(engine, expire_on_commit=False),
            outbox=Outbox.from_settings(settings),
            max_body_bytes=settings.max_body_bytes,
            crash_at=settings.crash_at,
        )
        halt = asyncio.Event()  # stop, or (in burst mode) nothing left to do
        mirror = asyncio.create_task(_mirror(stop, halt))
        supervisor = outage.Supervisor(
            "worker", on_outage=self._count_outage, urls=self._urls, stop=halt
        )
        try:
            await supervisor.run(
                connect=lambda: self._connect(engine),
                work=lambda: self._consume(pipeline, halt, burst=burst),
                close=lambda: self._close(halt.is_set()),
            )
        finally:
            mirror.cancel()
            await engine.dispose()

    async def _connect(self, engine: AsyncEngine) -> None:
        """Open the broker connection once the database answers (each may raise an outage)."""
        settings = self._settings
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        self._set_connected(outage.DATABASE, True)
        log.info("worker.connecting", amqp=self._urls[outage.BROKER])
        async with outage.reaching(outage.BROKER, self._urls[outage.BROKER]):
            self._connection = await rabbit.connect(settings.broker, name=self._name)

    async def _consume(self, pipeline: Pipeline, halt: asyncio.Event, *, burst: bool) -> None:
        settings = self._settings
        connection = self._connection
        self._broken.clear()
        self._broken_by = None
        self._stopping = False
        connection.close_callbacks.add(self._on_close)
        await rabbit.declare_queues(
            connection,
            exchange=settings.exchange,
            dead_letter_exchange=settings.dead_letter_exchange,
            queues=[_queue_spec(c, settings.delivery_limit) for c in self._router],
        )
        async with pipeline.sessions() as session:
            self._paused = set(await pauses.read(session, settings.schema_name))
        watched = []
        for consumer in self._router:
            if consumer.name not in self._paused:
                await self._subscribe(consumer, pipeline)
            watched += [consumer.name, f"{consumer.name}.dead"]
        self._consuming = True
        self._set_connected(outage.BROKER, True)
        log.info("worker.consuming", consumers=[c.name for c in self._router])
        follow = asyncio.ensure_future(self._follow_pauses(pipeline))
        waiters: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(halt.wait()),
            asyncio.ensure_future(self._broken.wait()),
        ]
        if burst:
            waiters.append(asyncio.ensure_future(self._until_idle(connection, watched, halt)))
        try:
            await asyncio.wait([*waiters, follow], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in [*waiters, follow]:
                waiter.cancel()
            await asyncio.wait([follow])
        if not follow.cancelled() and follow.exception() is not None:
            raise follow.exception()  # type: ignore[misc]
        if halt.is_set():
            return
        raise self._broken_by or outage.Unreachable(
            outage.BROKER, self._urls[outage.BROKER], ConnectionError("a channel closed")
        )

    async def _subscribe(self, consumer: Consumer[Any], pipeline: Pipeline) -> None:
        """Open *consumer*'s channel and consume its queue and its broker dead-letter queue."""
        name = consumer.name
        subscriber: Subscriber | None = None

        def closed(reason: BaseException | None) -> None:
            # Only the live channel of a running consumer closing is an outage; one a
            # pause closed (maybe finishing late, after a resume opened the next) is not.
            # A channel closing while it opens (subscriber still None) fails the open
            # itself, which reports the outage.
            if subscriber is not None and self._by_name.get(name) is subscriber:
                self._channel_closed(reason)

        subscriber = await Subscriber.open(
            await rabbit.open_channel(self._connection),
            prefetch=self._settings.worker_prefetch,
            on_close=closed,
        )
        self._subscribers.append(subscriber)
        self._by_name[name] = subscriber
        deliver = self._callback(consumer, pipeline, subscriber, dead=False)
        tag = await subscriber.consume(name, deliver)
        if not consumer.ordered:
            # An ordered (single-active-consumer) queue is never cancelled: a cancel
            # hands it to the next consumer while our unacked messages are still out,
            # and those would then overtake them. Closing the channel returns them
            # first (see _requeue).
            self._queues.append((subscriber, tag))
        deliver = self._callback(consumer, pipeline, subscriber, dead=True)
        tag = await subscriber.consume(f"{name}.dead", deliver)
        self._queues.append((subscriber, tag))

    async def _follow_pauses(self, pipeline: Pipeline) -> None:
        """Every ``pause_poll_interval``: stop the consumers paused, restart those resumed.

        Pausing lets that consumer's running handlers finish (up to ``shutdown_timeout``),
        then closes its channel: the broker takes its unacked messages back, in order.
        """
        interval = self._settings.pause_poll_interval
        while True:
            for consumer in self._router:
                self._metrics.consumer_paused(consumer.name, consumer.name in self._paused)
            await asyncio.sleep(interval)
            async with pipeline.sessions() as session:
                wanted = set(await pauses.read(session, self._settings.schema_name))
            for consumer in self._router:
                if consumer.name in wanted and consumer.name not in self._paused:
                    await self._pause(consumer.name)
                elif consumer.name not in wanted and consumer.name in self._paused:
                    self._paused.discard(consumer.name)
                    await self._subscribe(consumer, pipeline)
                    log.info("consumer.resumed", consumer=consumer.name)

    def _held(self, consumer: Consumer[Any], incoming: _Taken) -> bool:
        """Say whether *incoming* must not start: its consumer is paused, or its channel
        was closed by a pause (the broker has it back; an outage is handled elsewhere)."""
        stale = incoming.subscriber is not self._by_name.get(consumer.name)
        closing = self._broken.is_set() or self._stopping  # then _requeue decides
        return consumer.name in self._paused or (stale and not closing)

    async def _pause(self, name: str) -> None:
        self._paused.add(name)  # from now on no handler of *name* starts
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.shutdown_timeout
        while self._running[name] and loop.time() < deadline:  # noqa: ASYNC110 (a counter)
            await asyncio.sleep(0.02)
        subscriber = self._by_name.pop(name, None)
        if subscriber is not None:
            self._queues = [(s, t) for s, t in self._queues if s is not subscriber]
            self._subscribers = [s for s in self._subscribers if s is not subscriber]
            with contextlib.suppress(Exception):  # send its last acks, return the rest
                await asyncio.wait_for(subscriber.close(), timeout=5)
        self._batches.pop(name, None)
        log.warning("consumer.paused", consumer=name, left_running=self._running[name])

    async def _until_idle(self, connection: Any, queues: list[str], halt: asyncio.Event) -> None:
        """Set *halt* once every queue is empty and no delivery is unsettled, twice in a row."""
        quiet = 0
        while quiet < 2:
            await asyncio.sleep(0.05)
            idle = not self._unsettled and not self._inflight
            if idle and await rabbit.queue_depths(connection, queues):
                idle = False
            quiet = quiet + 1 if idle and not self._unsettled else 0
        log.info("worker.idle")
        halt.set()

    def _channel_closed(self, reason: BaseException | None) -> None:
        self._on_close(None, reason)

    def _on_close(self, _sender: Any, reason: BaseException | None = None, *_: Any) -> None:
        if self._broken_by is None and not self._stopping:
            self._broken_by = outage.Unreachable(
                outage.BROKER,
                self._urls[outage.BROKER],
                reason if reason is not None else ConnectionError("closed"),
            )
        self._broken.set()

    def _callback(
        self,
        consumer: Consumer[Any],
        pipeline: Pipeline,
        subscriber: Subscriber,
        *,
        dead: bool,
    ) -> Deliver:
        batched = self._settings.worker_batch_size > 1 and not consumer.ordered and not dead

        def on_delivery(delivery: Delivery, tag: int) -> None:
            # Our own task, not aiormq's: a closing channel must not cancel a handler
            # midway; the drain decides what finishes and what is requeued.
            self._unsettled += 1
            taken = _Taken(delivery, tag, subscriber)
            if batched:
                self._add_to_batch(consumer, taken, pipeline)
            else:
                self._spawn(self._handle(consumer, taken, pipeline, dead=dead))

        return on_delivery

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _add_to_batch(self, consumer: Consumer[Any], incoming: _Taken, pipeline: Pipeline) -> None:
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
        async with self._lanes.slot(transaction=False):  # dispatch_batch has its own
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
        batch: list[_Taken],
        pipeline: Pipeline,
    ) -> None:
        """Dispatch one batch (the caller holds a handler slot); ack after the commit."""
        if self._held(consumer, batch[0]):
            for incoming in batch:  # left unacked: closing the paused channel returns them
                await self._requeue(incoming, consumer, "not started: consumer paused")
            return
        if self._stopping or self._broken.is_set():
            for incoming in batch:
                await self._requeue(incoming, consumer, "not started: stopping or reconnecting")
            return
        started = time.perf_counter()
        inflight = self._metrics.inflight(consumer.name)
        self._running[consumer.name] += 1
        try:
            with inflight:
                results = await dispatch_batch([m.delivery for m in batch], consumer, pipeline)
        except asyncio.CancelledError:
            for incoming in batch:
                await asyncio.shield(self._requeue(incoming, consumer, "cancelled at shutdown"))
            raise
        except Exception as exc:
            # Its own task: a bug's backoff must not hold the handler slot we are in.
            self._spawn(self._failed(exc, consumer, batch))
            return
        finally:
            self._running[consumer.name] -= 1
        faults.crash_point(pipeline.crash_at, faults.WORKER_AFTER_COMMIT)
        self._bug_streak = 0
        seconds = (time.perf_counter() - started) / len(batch)
        for incoming, result in zip(batch, results, strict=True):
            await self._ack(incoming, consumer, result, seconds)

    async def _handle(
        self,
        consumer: Consumer[Any],
        incoming: _Taken,
        pipeline: Pipeline,
        *,
        dead: bool,
    ) -> None:
        key = (
            incoming.delivery.headers.get("postroom-key") if consumer.ordered and not dead else None
        )
        if key is None:
            await self._handle_in_slot(consumer, incoming, pipeline, dead=dead)
            return
        async with self._key_locks.hold(consumer.name, str(key)):
            await self._handle_in_slot(consumer, incoming, pipeline, dead=dead)

    async def _handle_in_slot(
        self,
        consumer: Consumer[Any],
        incoming: _Taken,
        pipeline: Pipeline,
        *,
        dead: bool,
    ) -> None:
        async with self._lanes.slot(transaction=not dead) as lane:
            if self._held(consumer, incoming):  # left unacked: the paused channel returns it
                await self._requeue(incoming, consumer, "not started: consumer paused")
                return
            if self._stopping or self._broken.is_set():
                await self._requeue(
                    incoming, consumer, "not started: worker stopping or reconnecting"
                )
                return
            delivery = incoming.delivery
            started = time.perf_counter()
            inflight = self._metrics.inflight(consumer.name)
            self._running[consumer.name] += 1
            try:
                with inflight:
                    if dead:
                        result = await record_broker_dead_letter(delivery, consumer, pipeline)
                    else:
                        result = await dispatch(delivery, consumer, pipeline, lane=lane)
            except asyncio.CancelledError:
                await asyncio.shield(self._requeue(incoming, consumer, "cancelled at shutdown"))
                raise
            except Exception as exc:
                failed: Exception | None = exc
            else:
                failed = None
            finally:
                self._running[consumer.name] -= 1
        if failed is not None:  # outside the slot: a bug's backoff must not hold it
            await self._failed(failed, consumer, [incoming], dead=dead)
            return
        faults.crash_point(pipeline.crash_at, faults.WORKER_AFTER_COMMIT)
        self._bug_streak = 0
        await self._ack(incoming, consumer, result, time.perf_counter() - started)

    async def _failed(
        self,
        exc: Exception,
        consumer: Consumer[Any],
        messages: list[_Taken],
        *,
        dead: bool = False,
    ) -> None:
        """No outcome was recorded for *messages*: tell outage, configuration and bug apart.

        Outage: requeue and reconnect. Configuration (postroom's schema missing): stop
        consuming and raise it from :meth:`run`. Anything else is a bug in postroom:
        logged with its traceback, the messages requeued after a backoff so they do not
        spin, the connections left up and the other consumers untouched. A message from
        a ``.dead`` queue has no broker delivery limit behind it: after
        :data:`DEAD_QUEUE_BUG_LIMIT` such requeues it is held unacked (it returns to its
        queue when the worker restarts) instead of circulating forever.
        """
        wrong = outage.config_error(exc, schema=self._settings.schema_name)
        if wrong is not None or outage.is_outage(exc):
            self._broken_by = self._broken_by or wrong or exc
            if wrong is None:
                self._set_connected(outage.peer_of(exc), False)
            self._broken.set()
            for incoming in messages:
                await self._requeue(incoming, consumer, outage.describe(exc))
            return
        self._metrics.bugs.labels("worker").inc()
        self._bug_streak += 1
        pause = min(5.0, 0.1 * 2 ** min(self._bug_streak, 6)) * (0.5 + random.random() / 2)
        log.error(
            "worker.bug",
            consumer=consumer.name,
            message_ids=[m.message_id for m in messages][:20],
            requeue_in_seconds=round(pause, 2),
            exc_info=exc,
        )
        if dead and self._hold_dead(consumer, messages[0]):
            return
        if not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._broken.wait(), pause)
        for incoming in messages:
            await self._requeue(incoming, consumer, outage.describe(exc), now=True)

    def _hold_dead(self, consumer: Consumer[Any], incoming: _Taken) -> bool:
        """Count a bug on a ``.dead`` delivery; return True once it is held, not requeued."""
        name = (consumer.name, str(incoming.message_id or incoming.tag))
        failures = self._dead_bugs[name] = self._dead_bugs.get(name, 0) + 1
        if failures < DEAD_QUEUE_BUG_LIMIT:
            return False
        self._unsettled -= 1
        log.error(
            "worker.dead_letter_held",
            consumer=consumer.name,
            message_id=incoming.message_id,
            failures=failures,
            detail=f"could not be recorded from {consumer.name}.dead; left unacked until "
            "this worker restarts (see the worker.bug lines for why)",
        )
        return True

    async def _ack(
        self,
        incoming: _Taken,
        consumer: Consumer[Any],
        result: Result,
        seconds: float,
    ) -> None:
        self._unsettled -= 1
        # Sent with the subscriber's next flush; if the channel dies first, the
        # redelivery finds the inbox row (a duplicate, acked without running again).
        incoming.subscriber.ack(incoming.tag)
        outcome = result.outcome
        labels = (consumer.name, result.topic or "unknown", outcome.value)
        record = self._recorders.get(labels)
        if record is None:
            record = self._recorders[labels] = self._metrics.handled_recorder(
                consumer=labels[0], topic=labels[1], outcome=labels[2]
            )
        record(seconds)
        self._latency.observe(consumer.name, result)
        # Successes only at DEBUG, and no log call at all otherwise: a JSON line per
        # message cost ~10% of a worker's CPU, and the metrics count them; failures were
        # logged when their outcome was written.
        quiet = outcome is Outcome.ACKED or outcome is Outcome.DUPLICATE
        if quiet and not self._debug:
            return
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
        self,
        incoming: _Taken,
        consumer: Consumer[Any],
        why: str,
        *,
        now: bool = False,
    ) -> None:
        """Give *incoming* back to the broker, unprocessed.

        By default it is left unacked: this is only called when the channel is about
        to close (stopping, an outage, a configuration error), and a closing channel
        returns all its unacked messages at once, in delivery order, ahead of the queue.
        Rejecting them one by one would let the broker deliver them straight back to
        this still-open consumer (a requeue loop), and, for an ordered consumer, put a
        message behind those that followed it. *now* rejects at once (channel staying
        open: a bug's requeue).
        """
        self._unsettled -= 1
        self._metrics.consumer_requeued.labels(consumer.name).inc()
        log.info(
            "message.requeued",
            message_id=incoming.message_id,
            consumer=consumer.name,
            reason=why,
        )
        if now:
            incoming.subscriber.reject(incoming.tag, requeue=True)

    async def _close(self, stopping: bool) -> None:
        """Stop consuming, drain in-flight handlers (bounded), then close the connection."""
        self._stopping = stopping
        self._consuming = False
        for subscriber, tag in self._queues:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(subscriber.cancel(tag), timeout=2)
        self._queues.clear()
        self._by_name.clear()
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
        self._unsettled = 0
        self._dead_bugs.clear()
        await self._lanes.close()  # nothing runs on them now: roll back, return to the pool
        for subscriber in self._subscribers:  # send the last acks, return the rest
            with contextlib.suppress(Exception):
                await asyncio.wait_for(subscriber.close(), timeout=5)
        self._subscribers.clear()
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=5)
        self._set_connected(outage.BROKER, False)

    def _count_outage(self) -> None:
        self._metrics.reconnects.labels("worker").inc()

    def _set_connected(self, peer: str, up: bool) -> None:
        self._metrics.connected(component="worker", peer=peer, up=up)


async def _mirror(stop: asyncio.Event, halt: asyncio.Event) -> None:
    await stop.wait()
    halt.set()


def _queue_spec(consumer: Consumer[Any], delivery_limit: int) -> rabbit.QueueSpec:
    return rabbit.QueueSpec(
        name=consumer.name,
        topics=consumer.topics,
        delivery_limit=delivery_limit,
        single_active_consumer=consumer.ordered,
    )


async def work_forever(
    settings: Settings, router: Router, stop: asyncio.Event, *, metrics: Metrics | None = None
) -> None:
    """Run one worker until *stop* is set (the `postroom worker` command's body)."""
    await Worker(settings, router, metrics=metrics).run(stop)
