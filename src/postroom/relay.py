"""The relay: publish committed outbox rows to RabbitMQ, at least once, in key order.

Each cycle claims due rows with ``FOR UPDATE SKIP LOCKED``, publishes them with
confirms in flight and ``mandatory``, then deletes the confirmed rows (and reschedules
the refused ones) in the claim's own transaction. A crash before that commit means a
re-publish, never a loss; consumers' inboxes absorb the duplicate.

Per-key order across several relays: a keyed row is claimed only while holding the
transaction-level advisory lock of its key's partition, and only if no earlier row of
the key is waiting (delayed, rescheduled, or locked by another transaction), so one
relay at a time publishes a key, in id order, which is commit order for writers that
serialise on the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from datetime import timedelta
from typing import Any

import asyncpg
import structlog

from postroom import faults, outage, rabbit, tracing
from postroom.metrics import Metrics, RelayStats
from postroom.outbox import RELAY_PRESENCE, notify_channel, relay_presence_key
from postroom.settings import Settings
from postroom.tables import qualified
from postroom.unroutable import UnroutablePolicy, topic_patterns

log = structlog.get_logger("postroom.relay")

MAX_ERROR_CHARS = 2000
RESCHEDULE_BASE = timedelta(seconds=1)
RESCHEDULE_CAP = timedelta(minutes=5)


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
        self._fallback_logged = False
        self._metrics = metrics if metrics is not None else Metrics()
        self.stats = RelayStats(self._metrics)
        """Live counts, read from the metrics."""
        self._unroutable = UnroutablePolicy(
            drop=topic_patterns(settings.unroutable_drop),
            interval=settings.log_interval,
            counts=self._metrics,
        )
        self._peer_state(database=False, broker=False)
        self._claim_sql = _claim_sql(self._outbox)
        self._urls = {
            outage.DATABASE: settings.database.redacted,
            outage.BROKER: settings.broker.redacted,
        }
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

        Broker or database outages are waited out (one supervisor, capped jittered
        backoff, each wait logged with the dependency, its redacted URL and the error);
        every row not confirmed stays in the outbox for the next claim. A missing or
        outdated postroom schema raises :class:`~postroom.errors.ConfigError`. Any other
        error is a bug: logged at ERROR with its traceback, the batch rolled back (its
        rows stay), and the relay tries again after a backoff without reconnecting.
        """
        await self._supervise(stop, idle=None)

    async def run_until_idle(self, *, timeout: float | None = None) -> None:
        """Relay until no due row remains in the outbox, then close and return.

        For tests and one-shot jobs that wait for a state: rows the broker refused are
        rescheduled for later and so do not count as due. Outages are waited out as in
        :meth:`run` (bounded by *timeout*, which raises ``TimeoutError``).
        """
        stop = asyncio.Event()
        async with asyncio.timeout(timeout):
            await self._supervise(stop, idle=stop)

    async def _supervise(self, stop: asyncio.Event, *, idle: asyncio.Event | None) -> None:
        settings = self._settings
        supervisor = outage.Supervisor(
            "relay", on_outage=self._count_outage, urls=self._urls, stop=stop
        )
        try:
            await supervisor.run(
                connect=self._connect,
                work=lambda: self._loop(stop, idle=idle),
                close=self._disconnect,
            )
        except Exception as exc:
            wrong = outage.config_error(exc, schema=settings.schema_name)
            if wrong is not None:
                raise wrong from exc
            raise

    async def _connect(self) -> None:
        settings, urls = self._settings, self._urls
        log.info("relay.connecting", database=urls[outage.DATABASE], amqp=urls[outage.BROKER])
        async with outage.reaching(outage.DATABASE, urls[outage.DATABASE]):
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
        async with outage.reaching(outage.BROKER, urls[outage.BROKER]):
            self._amqp = await rabbit.connect(settings.broker, name=self._name)
        await rabbit.declare_exchange(self._amqp, settings.exchange)
        self._publisher = await rabbit.ConfirmingPublisher.open(self._amqp)
        self._metrics.relay_batched_publish.set(1 if self._publisher.batched else 0)
        if not self._publisher.batched and not self._fallback_logged:
            self._fallback_logged = True
            log.warning(
                "relay.publish_fallback",
                detail="the installed aiormq lacks the channel tables batched publishing "
                "uses; publishing one message at a time (slower). Install the aiormq "
                "version pinned by postroom.",
            )
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

    def _count_outage(self) -> None:
        self._metrics.reconnects.labels("relay").inc()

    def _peer_state(self, *, database: bool | None = None, broker: bool | None = None) -> None:
        for peer, up in (("database", database), ("broker", broker)):
            if up is not None:
                self._metrics.connected(component="relay", peer=peer, up=up)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _loop(self, stop: asyncio.Event, *, idle: asyncio.Event | None = None) -> None:
        batch_size = self._settings.relay_batch_size
        bugs = 0
        while not stop.is_set():
            if not self.ready:  # noticed between batches, so /readyz and reconnects are prompt
                peer = outage.BROKER if self._db and not self._db.is_closed() else outage.DATABASE
                raise outage.Unreachable(
                    peer, self._urls[peer], ConnectionError("the connection was closed")
                )
            self._wake.clear()
            try:
                published = await self.cycle()
            except Exception as exc:
                if outage.is_outage(exc) or outage.config_error(
                    exc, schema=self._settings.schema_name
                ):
                    raise
                bugs += 1
                pause = min(5.0, 0.1 * 2 ** min(bugs, 6))
                self._metrics.bugs.labels("relay").inc()
                log.error("relay.bug", retry_in_seconds=pause, exc_info=exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
                continue
            bugs = 0
            if published >= batch_size:
                continue  # more is probably waiting
            if idle is not None and not await self._due():
                log.info("relay.idle")
                idle.set()
                return
            await self._sleep(stop)

    async def _due(self) -> bool:
        assert self._db is not None
        due: bool = await self._db.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {self._outbox} WHERE available_at <= now())"  # noqa: S608
        )
        return due

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
        failed_ids = {row["id"] for row, _ in failed}
        published_now: dict[str, int] = {}
        failed_now: dict[str, int] = {}
        for row in rows:
            counts = failed_now if row["id"] in failed_ids else published_now
            counts[row["topic"]] = counts.get(row["topic"], 0) + 1
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
    # SKIP LOCKED passes over rows another transaction holds (a long transaction, an
    # operator's UPDATE): the outer filter then drops the claimed rows of a key whose
    # earlier row was passed over, so a key never jumps its head.
    return (
        "WITH claimed AS ("  # noqa: S608
        "SELECT o.id, o.message_id, o.topic, o.exchange, o.routing_key, o.headers, o.body, "
        "o.content_type, o.correlation_id, o.occurred_at, o.attempts, o.ordering_key "
        f"FROM {outbox} AS o "
        "WHERE o.available_at <= now() AND (o.ordering_key IS NULL OR ("
        f"{_PARTITION} = ANY($3::int[]) "
        f"AND NOT EXISTS (SELECT 1 FROM {outbox} AS e WHERE e.ordering_key = o.ordering_key "
        "AND e.id < o.id AND e.available_at > now()))"
        ") ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED) "
        "SELECT c.* FROM claimed AS c WHERE c.ordering_key IS NULL OR NOT EXISTS ("
        f"SELECT 1 FROM {outbox} AS e WHERE e.ordering_key = c.ordering_key "
        "AND e.id < c.id AND e.id NOT IN (SELECT id FROM claimed)) ORDER BY c.id"
    )


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


async def relay_forever(settings: Settings, stop: asyncio.Event) -> None:
    """Run one relay until *stop* is set (the `postroom relay` command's body)."""
    await Relay(settings).run(stop)
