"""The relay: publish committed outbox rows to RabbitMQ, at least once, in key order.

Each cycle claims due rows with ``FOR UPDATE SKIP LOCKED``, publishes them with
confirms in flight and ``mandatory``, then deletes the confirmed rows (and reschedules
the refused ones) in the claim's own transaction. A crash before that commit means a
re-publish, never a loss; consumers' inboxes absorb the duplicate.

Per-key order across several relays: a keyed row is claimed only while holding the
transaction-level advisory lock of its key's partition, and only if no earlier row of
the key is waiting (delayed or rescheduled), so one relay at a time publishes a key,
in id order, which is commit order for writers that serialise on the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import structlog
from tenacity import AsyncRetrying, retry_if_exception, wait_random_exponential

from postroom import faults, rabbit, tracing
from postroom.metrics import Metrics
from postroom.outage import is_outage
from postroom.outbox import RELAY_PRESENCE, notify_channel, relay_presence_key
from postroom.settings import Settings, redact_url
from postroom.tables import qualified
from postroom.unroutable import UnroutablePolicy, topic_patterns

log = structlog.get_logger("postroom.relay")

MAX_ERROR_CHARS = 2000
RESCHEDULE_BASE = timedelta(seconds=1)
RESCHEDULE_CAP = timedelta(minutes=5)


@dataclass
class RelayStats:
    """Counters a health endpoint or a test can read; never reset while running."""

    published: int = 0
    failed: int = 0
    batches: int = 0
    reconnects: int = 0
    last_batch_seconds: float = 0.0
    failed_by_topic: dict[str, int] = field(default_factory=dict)
    published_by_topic: dict[str, int] = field(default_factory=dict)


def lock_namespace(schema: str) -> int:
    """Advisory-lock namespace for *schema*'s outbox, so two outboxes never contend."""
    return zlib.crc32(f"postroom:{schema}".encode()) & 0x7FFFFFFF


class Relay:
    """Publish an outbox to RabbitMQ until told to stop; reconnects by itself."""

    def __init__(
        self, settings: Settings, *, name: str = "postroom-relay", metrics: Metrics | None = None
    ) -> None:
        self._settings = settings
        self._name = name
        self._outbox = qualified(settings.schema_name, "outbox")
        self._wake = asyncio.Event()
        self._db: asyncpg.Connection[Any] | None = None
        self._amqp: Any = None
        self._publisher: rabbit.ConfirmingPublisher | None = None
        self.stats = RelayStats()
        self._metrics = metrics
        self._unroutable = UnroutablePolicy(
            drop=topic_patterns(settings.unroutable_drop),
            interval=settings.log_interval,
            counts=metrics,
        )
        self._peer_state(database=False, broker=False)
        self._claim_sql = _claim_sql(self._outbox)
        self._head_partitions_sql = _head_partitions_sql(self._outbox)

    @property
    def ready(self) -> bool:
        """True while connected to both the database and the broker."""
        return (
            self._db is not None
            and not self._db.is_closed()
            and self._publisher is not None
            and self._publisher.is_open
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until *stop* is set; finish the batch in hand, then close.

        Broker or database outages are retried forever with capped, jittered backoff
        (reset after each successful connection); every row not confirmed stays in the
        outbox for the next claim. Other errors (no such table, bad credentials) raise.
        """
        while not stop.is_set():
            try:
                await self._connect_with_backoff(stop)
                if stop.is_set():
                    return
                await self._loop(stop)
            except BaseException as exc:
                if not is_outage(exc):
                    raise
                self.stats.reconnects += 1
                log.warning("relay.outage", error=_short(exc))
            finally:
                await self._disconnect()

    async def _connect_with_backoff(self, stop: asyncio.Event) -> None:
        async def sleep(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: is_outage(exc) and not stop.is_set()),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            sleep=sleep,
            reraise=True,
            before_sleep=lambda state: log.warning(
                "relay.connect_failed",
                attempt=state.attempt_number,
                error=_short(state.outcome.exception()) if state.outcome else None,  # type: ignore[arg-type]
            ),
        )
        async for attempt in retrying:
            with attempt:
                await self._disconnect()
                await self._connect()

    async def _connect(self) -> None:
        settings = self._settings
        log.info(
            "relay.connecting",
            database=redact_url(settings.asyncpg_dsn),
            amqp=redact_url(settings.amqp_url.get_secret_value()),
        )
        self._db = await settings.database.connect(application_name=self._name, timeout=10)
        await self._db.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        await self._db.add_listener(notify_channel(settings.schema_name), self._on_notify)
        # Presence: producers and `postroom check` see in pg_locks which schemas relays serve.
        await self._db.execute(
            "SELECT pg_advisory_lock_shared($1::int, $2::int)",
            RELAY_PRESENCE,
            relay_presence_key(settings.schema_name),
        )
        self._peer_state(database=True)
        self._amqp = await rabbit.connect(settings.broker, name=self._name)
        await rabbit.declare_exchange(self._amqp, settings.exchange)
        self._publisher = await rabbit.ConfirmingPublisher.open(self._amqp)
        self._peer_state(broker=True)
        log.info("relay.connected")

    async def _disconnect(self) -> None:
        publisher, self._publisher = self._publisher, None
        amqp, self._amqp = self._amqp, None
        db, self._db = self._db, None
        self._peer_state(database=False, broker=False)
        for closer in (
            publisher.close() if publisher else None,
            amqp.close() if amqp else None,
            db.close(timeout=2) if db else None,
        ):
            if closer is None:
                continue
            try:
                await asyncio.wait_for(closer, timeout=5)
            except Exception as exc:  # closing a broken connection may fail; it is gone anyway
                log.debug("relay.close_failed", error=_short(exc))

    def _peer_state(self, *, database: bool | None = None, broker: bool | None = None) -> None:
        if self._metrics is None:
            return
        for peer, up in (("database", database), ("broker", broker)):
            if up is not None:
                self._metrics.connected(component="relay", peer=peer, up=up)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _loop(self, stop: asyncio.Event) -> None:
        batch_size = self._settings.relay_batch_size
        while not stop.is_set():
            if not self.ready:  # noticed between batches, so /readyz and reconnects are prompt
                raise ConnectionError("the database or broker connection was closed")
            self._wake.clear()
            published = await self.cycle()
            if published >= batch_size:
                continue  # more is probably waiting
            await self._sleep(stop)

    async def _sleep(self, stop: asyncio.Event) -> None:
        assert self._db is not None
        timeout = self._settings.poll_interval
        next_due = await self._db.fetchval(
            f"SELECT extract(epoch FROM min(available_at) - now()) FROM {self._outbox} "  # noqa: S608
            "WHERE available_at > now()"
        )
        if next_due is not None:
            timeout = max(0.0, min(timeout, float(next_due)))
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def cycle(self) -> int:
        """Claim, publish and settle one batch; return how many rows were published."""
        db, publisher = self._db, self._publisher
        assert db is not None and publisher is not None, "cycle() needs a connected relay"
        settings = self._settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with db.transaction():
            held = await self._lock_partitions(db)
            rows = await db.fetch(
                self._claim_sql, settings.relay_batch_size, settings.relay_key_partitions, held
            )
            if not rows:
                return 0
            outgoing = [self._outgoing(row) for row in rows]
            with tracing.sending(outgoing) as sending:  # producer spans, if OpenTelemetry
                outcomes = await publisher.publish_many(sending.messages)
                sending.settle(outcomes)
            faults.crash_point(settings.crash_at, faults.RELAY_AFTER_CONFIRM)
            done = [row["id"] for row, error in zip(rows, outcomes, strict=True) if error is None]
            failed = [
                (row, error) for row, error in zip(rows, outcomes, strict=True) if error is not None
            ]
            dropped = self._dropped(failed)
            if dropped:
                done += [row["id"] for row, _ in dropped]
                failed = [item for item in failed if item not in dropped]
            if done:
                await db.execute(f"DELETE FROM {self._outbox} WHERE id = ANY($1::bigint[])", done)  # noqa: S608
            if failed:
                await self._reschedule(db, failed)
        skipped = {row["id"] for row, _ in dropped}
        kept = [row for row in rows if row["id"] not in skipped]
        self._account(kept, failed, loop.time() - started)
        return len(done)

    async def _lock_partitions(self, db: asyncpg.Connection[Any]) -> list[int]:
        """Lock the key partitions at the head of the outbox that no other relay holds.

        Locks are taken in a statement of their own, each partition tried once, so the
        claim that follows sees a stable set: a partition is either ours for the whole
        transaction or untouched. (Trying the lock per row inside the claim would let a
        lock freed mid-scan admit a later row of a key whose earlier row was skipped.)
        """
        settings = self._settings
        partitions = await db.fetchval(
            self._head_partitions_sql, settings.relay_batch_size, settings.relay_key_partitions
        )
        if not partitions:
            return []
        held: list[int] = await db.fetchval(
            "SELECT coalesce(array_agg(p), '{}') FROM unnest($1::int[]) AS p "
            "WHERE pg_try_advisory_xact_lock($2::int, p)",
            partitions,
            lock_namespace(settings.schema_name),
        )
        return held

    def _outgoing(self, row: asyncpg.Record) -> rabbit.Outgoing:
        return rabbit.Outgoing(
            exchange=row["exchange"] if row["exchange"] is not None else self._settings.exchange,
            routing_key=row["routing_key"],
            body=row["body"],
            message_id=str(row["message_id"]),
            topic=row["topic"],
            timestamp=row["occurred_at"],
            content_type=row["content_type"],
            correlation_id=row["correlation_id"],
            headers=row["headers"],
        )

    async def _reschedule(
        self, db: asyncpg.Connection[Any], failed: list[tuple[asyncpg.Record, BaseException]]
    ) -> None:
        ids, errors, delays = [], [], []
        for row, error in failed:
            attempts = row["attempts"] + 1
            delay = min(RESCHEDULE_BASE * 2 ** min(attempts - 1, 20), RESCHEDULE_CAP)
            ids.append(row["id"])
            errors.append(str(error)[:MAX_ERROR_CHARS])
            delays.append(delay)
            self._unroutable.failed(
                topic=row["topic"],
                unroutable=isinstance(error, rabbit.Unroutable),
                dropped=False,
                error=str(error),
                retry_in=delay.total_seconds(),
                queue=row["routing_key"] if row["exchange"] is not None else None,
            )
        await db.execute(
            f"UPDATE {self._outbox} AS o SET attempts = o.attempts + 1, "  # noqa: S608
            "last_error = f.error, available_at = now() + f.delay "
            "FROM unnest($1::bigint[], $2::text[], $3::interval[]) AS f(id, error, delay) "
            "WHERE o.id = f.id",
            ids,
            errors,
            delays,
        )

    def _dropped(
        self, failed: list[tuple[asyncpg.Record, BaseException]]
    ) -> list[tuple[asyncpg.Record, BaseException]]:
        """The failed rows the unroutable policy deletes on purpose (counted, logged)."""
        dropped = []
        for row, error in failed:
            unroutable = isinstance(error, rabbit.Unroutable)
            topic, exchange = row["topic"], row["exchange"]
            if self._unroutable.drops(topic=topic, exchange=exchange, unroutable=unroutable):
                self._unroutable.failed(
                    topic=topic, unroutable=True, dropped=True, error=str(error), retry_in=0.0
                )
                dropped.append((row, error))
        return dropped

    def _account(
        self,
        rows: list[asyncpg.Record],
        failed: list[tuple[asyncpg.Record, BaseException]],
        seconds: float,
    ) -> None:
        stats = self.stats
        stats.batches += 1
        stats.last_batch_seconds = seconds
        failed_ids = {row["id"] for row, _ in failed}
        published_now: dict[str, int] = {}
        failed_now: dict[str, int] = {}
        for row in rows:
            topic = row["topic"]
            if row["id"] in failed_ids:
                stats.failed += 1
                stats.failed_by_topic[topic] = stats.failed_by_topic.get(topic, 0) + 1
                failed_now[topic] = failed_now.get(topic, 0) + 1
            else:
                stats.published += 1
                stats.published_by_topic[topic] = stats.published_by_topic.get(topic, 0) + 1
                published_now[topic] = published_now.get(topic, 0) + 1
        if self._metrics is not None:
            self._metrics.relay_batch(
                seconds=seconds, published_by_topic=published_now, failed_by_topic=failed_now
            )
        log.debug("relay.batch", rows=len(rows), failed=len(failed), seconds=round(seconds, 4))


_PARTITION = "(hashtext(o.ordering_key) & 2147483647) % $2::int"


def _head_partitions_sql(outbox: str) -> str:
    # $1 how many rows from the head to look at, $2 key partitions.
    return (
        f"SELECT array_agg(DISTINCT {_PARTITION}) FROM ("  # noqa: S608
        f"SELECT o.ordering_key FROM {outbox} AS o "
        "WHERE o.ordering_key IS NOT NULL AND o.available_at <= now() "
        "ORDER BY o.id LIMIT $1) AS o"
    )


def _claim_sql(outbox: str) -> str:
    # $1 batch size, $2 key partitions, $3 partitions this transaction holds.
    return (
        "SELECT o.id, o.message_id, o.topic, o.exchange, o.routing_key, o.headers, o.body, "  # noqa: S608
        "o.content_type, o.correlation_id, o.occurred_at, o.attempts "
        f"FROM {outbox} AS o "
        "WHERE o.available_at <= now() AND (o.ordering_key IS NULL OR ("
        f"{_PARTITION} = ANY($3::int[]) "
        f"AND NOT EXISTS (SELECT 1 FROM {outbox} AS e WHERE e.ordering_key = o.ordering_key "
        "AND e.id < o.id AND e.available_at > now()))"
        ") ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED"
    )


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


async def relay_forever(settings: Settings, stop: asyncio.Event) -> None:
    """Run one relay until *stop* is set (the `postroom relay` command's body)."""
    await Relay(settings).run(stop)
