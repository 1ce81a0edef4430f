"""Prometheus metrics of a postroom process, in a registry of its own.

One :class:`Metrics` per process, built at the edge and passed in (no module globals, no
default registry), so tests and embedding services can run several side by side. Label
values are bounded: component, peer and outcome are closed sets checked here, consumer and
topic are names a service declares; a message id never becomes a label.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = frozenset({"acked", "duplicate", "retry", "dead"})
"""What became of a delivery: handled and committed, already in the inbox, rescheduled, dead."""
COMPONENTS = frozenset({"relay", "worker"})
PEERS = frozenset({"database", "broker"})
DELIVERIES = ("first", "retry", "replay")
"""Which send of a message a handler committed: its first attempt (a broker redelivery
included), a retry after a failed attempt, or a replay of a dead letter. Kept apart so
retries' backoff and replays' age never pollute the first-attempt latency."""

# Publishing a batch takes milliseconds to seconds; a handler, milliseconds to minutes.
_BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Producer's event to handler's commit: a millisecond on a quiet system, minutes behind a
# backlog, hours for a replay.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip


class Metrics:
    """Every postroom metric, registered in :attr:`registry` (a fresh one by default).

    The recording methods are cheap and never raise for valid labels; an unknown outcome,
    component or peer raises ValueError, because a typo there would be a silent new series.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.outbox_pending = Gauge(
            "postroom_outbox_pending_messages",
            "Outbox rows due for publishing and not yet published.",
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            "postroom_outbox_oldest_pending_age_seconds",
            "How long the oldest due outbox row has waited to be published (the lag SLO).",
            registry=r,
        )
        self.outbox_errored = Gauge(
            "postroom_outbox_errored_messages",
            "Outbox rows whose last publish attempt failed (waiting to be tried again).",
            registry=r,
        )
        self.outbox_polled = Gauge(
            "postroom_outbox_last_poll_timestamp_seconds",
            "Unix time the outbox gauges were last refreshed; stale means they are too.",
            registry=r,
        )
        self.outbox_unroutable = Gauge(
            "postroom_outbox_unroutable_messages",
            "Outbox rows the broker returned: no queue is bound for their routing key.",
            registry=r,
        )
        self.relay_published = Counter(
            "postroom_relay_published",
            "Messages the relay published and the broker confirmed.",
            ["topic"],
            registry=r,
        )
        self.relay_failed = Counter(
            "postroom_relay_failed",
            "Messages the broker refused or returned; they stay in the outbox for later.",
            ["topic"],
            registry=r,
        )
        self.relay_unroutable = Counter(
            "postroom_relay_unroutable",
            "Publishes the broker returned because no queue is bound (events nobody consumes yet).",
            ["topic"],
            registry=r,
        )
        self.relay_dropped = Counter(
            "postroom_relay_dropped",
            "Unroutable events deleted on purpose (topics in POSTROOM_UNROUTABLE_DROP).",
            ["topic"],
            registry=r,
        )
        self.relay_batch_seconds = Histogram(
            "postroom_relay_batch_duration_seconds",
            "Time to claim, publish (with confirms) and settle one relay batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.relay_batched_publish = Gauge(
            "postroom_relay_batched_publish",
            "1 while the relay publishes each batch in one write; 0 if the installed aiormq "
            "lacks the channel tables that needs and it fell back to one publish per message.",
            registry=r,
        )
        self.consumer_messages = Counter(
            "postroom_consumer_messages",
            "Deliveries a consumer finished, by outcome (acked, duplicate, retry, dead).",
            ["consumer", "topic", "outcome"],
            registry=r,
        )
        self.consumer_requeued = Counter(
            "postroom_consumer_requeued",
            "Deliveries given back to the broker unprocessed (stopping, an outage, a bug).",
            ["consumer"],
            registry=r,
        )
        self.reconnects = Counter(
            "postroom_reconnects",
            "Outages (database or broker) a relay or worker rode out by reconnecting.",
            ["component"],
            registry=r,
        )
        self.bugs = Counter(
            "postroom_bugs",
            "Unexpected errors inside postroom, each logged at ERROR with its traceback.",
            ["component"],
            registry=r,
        )
        self.handler_seconds = Histogram(
            "postroom_handler_duration_seconds",
            "Time to handle one delivery: inbox check, handler, commit.",
            ["consumer"],
            buckets=_HANDLER_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            "postroom_delivery_latency_seconds",
            "From the event's occurred_at (set when it was published) to the commit of the "
            "handler that took it, per consumer and delivery (first, retry, replay).",
            ["consumer", "delivery"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.handlers_in_flight = Gauge(
            "postroom_handlers_in_flight",
            "Handlers running now.",
            ["consumer"],
            registry=r,
        )
        self.connection_up = Gauge(
            "postroom_connection_up",
            "1 while the component is connected to the peer, 0 otherwise.",
            ["component", "peer"],
            registry=r,
        )
        self.queue_messages_ready = Gauge(
            "postroom_queue_messages_ready",
            "Messages waiting in a consumer's queue (ready, not yet delivered to a worker).",
            ["consumer"],
            registry=r,
        )
        self.ready = Gauge(
            "postroom_ready",
            "1 while the process's /readyz would answer 200 (evaluated at each scrape).",
            ["component"],
            registry=r,
        )
        self.paused = Gauge(
            "postroom_consumer_paused",
            "1 while the consumer is paused (`postroom consumers pause`), 0 otherwise.",
            ["consumer"],
            registry=r,
        )
        self.loop_lag = Gauge(
            "postroom_event_loop_lag_seconds",
            "How late the health server's last heartbeat ran; high means a blocked loop.",
            registry=r,
        )

    def relay_batch(
        self,
        *,
        seconds: float,
        published_by_topic: Mapping[str, int],
        failed_by_topic: Mapping[str, int],
    ) -> None:
        """Record one settled relay batch: its duration and what it published or failed."""
        self.relay_batch_seconds.observe(seconds)
        for topic, count in published_by_topic.items():
            self.relay_published.labels(topic).inc(count)
        for topic, count in failed_by_topic.items():
            self.relay_failed.labels(topic).inc(count)

    def relay_unroutable_count(self, topic: str, count: int) -> None:
        """Count *count* publishes of *topic* that no queue was bound for."""
        self.relay_unroutable.labels(topic).inc(count)

    def relay_dropped_count(self, topic: str, count: int) -> None:
        """Count *count* unroutable events of *topic* dropped by the deployment's policy."""
        self.relay_dropped.labels(topic).inc(count)

    def outbox_state(
        self, *, pending: int, oldest_age_seconds: float, errored: int, unroutable: int = 0
    ) -> None:
        """Set the outbox gauges from one query of the outbox table."""
        self.outbox_pending.set(pending)
        self.outbox_oldest_age.set(oldest_age_seconds)
        self.outbox_errored.set(errored)
        self.outbox_unroutable.set(unroutable)
        self.outbox_polled.set_to_current_time()

    def latency(self, consumers: Mapping[str, Iterable[str]]) -> DeliveryLatency:
        """Return the latency recorder of *consumers* (name to topics), children bound once.

        Also creates every consumer's outcome counters at zero, so a first dead letter or
        retry is an increase Prometheus sees, not the birth of a series it cannot rate.
        """
        for consumer, topics in consumers.items():
            for topic in topics:
                for outcome in OUTCOMES:
                    self.consumer_messages.labels(consumer, topic, outcome)
        return DeliveryLatency(self.delivery_latency, consumers)

    def queue_ready(self, consumer: str, ready: int) -> None:
        """Record how many messages wait in *consumer*'s queue."""
        self.queue_messages_ready.labels(consumer).set(ready)

    def readiness(self, component: str, check: Callable[[], str | None]) -> None:
        """Export *component*'s readiness: *check* (None means ready) runs at each scrape."""
        _check(component, COMPONENTS, "component")

        def value() -> float:
            try:
                return 1.0 if check() is None else 0.0
            except Exception:  # a broken check is "not ready", as on /readyz
                return 0.0

        self.ready.labels(component).set_function(value)

    def handled(self, *, consumer: str, topic: str, outcome: str, seconds: float) -> None:
        """Record one finished delivery of *consumer*; *outcome* is one of :data:`OUTCOMES`."""
        # One path: the worker keeps the recorder per label set (no lookup per message).
        self.handled_recorder(consumer=consumer, topic=topic, outcome=outcome)(seconds)

    def handled_recorder(
        self, *, consumer: str, topic: str, outcome: str
    ) -> Callable[[float], None]:
        """Return a function recording one finished delivery with these labels.

        The labels are checked and looked up once, here: a worker keeps the function and
        calls it per message (the success path does no label lookup)."""
        _check(outcome, OUTCOMES, "outcome")
        count = self.consumer_messages.labels(consumer, topic, outcome).inc
        observe = self.handler_seconds.labels(consumer).observe

        def record(seconds: float) -> None:
            count()
            observe(seconds)

        return record

    @contextlib.contextmanager
    def inflight(self, consumer: str) -> Iterator[None]:
        """Count a handler of *consumer* as running for the duration of the block."""
        gauge = self.handlers_in_flight.labels(consumer)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def connected(self, *, component: str, peer: str, up: bool) -> None:
        """Record whether *component* (relay, worker) is connected to *peer* (database, broker)."""
        _check(component, COMPONENTS, "component")
        _check(peer, PEERS, "peer")
        self.connection_up.labels(component, peer).set(1 if up else 0)

    def consumer_paused(self, consumer: str, paused: bool) -> None:
        """Record whether *consumer* is paused, as this worker last read it."""
        self.paused.labels(consumer).set(1 if paused else 0)

    def totals(self, counter: Counter, *, by: str | None = None, **match: str) -> dict[str, float]:
        """Sum *counter*'s samples whose labels equal *match*, grouped by label *by*.

        With ``by=None`` the single key is ``""``. The metrics are the one source of
        counts: relays and workers report their totals by reading them here.
        """
        totals: dict[str, float] = {}
        for family in counter.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                if any(sample.labels.get(k) != v for k, v in match.items()):
                    continue
                key = sample.labels.get(by, "") if by else ""
                totals[key] = totals.get(key, 0.0) + sample.value
        return totals


class WorkerStats:
    """A live view of one worker's counts, read from its :class:`Metrics` (the one source).

    Counts are of the registry: workers sharing one :class:`Metrics` see each other's.
    """

    def __init__(self, metrics: Metrics, consumers: list[str]) -> None:
        self._metrics = metrics
        self._consumers = consumers

    @property
    def outcomes(self) -> dict[str, int]:
        """Finished deliveries by outcome (acked, duplicate, retry, dead); absent if 0."""
        found: dict[str, int] = {}
        for name in self._consumers:
            totals = self._metrics.totals(
                self._metrics.consumer_messages, by="outcome", consumer=name
            )
            for outcome, value in totals.items():
                found[outcome] = found.get(outcome, 0) + int(value)
        return {k: v for k, v in found.items() if v}

    @property
    def requeued(self) -> int:
        """Deliveries given back to the broker unprocessed."""
        metrics = self._metrics
        return sum(
            int(metrics.totals(metrics.consumer_requeued, consumer=name).get("", 0))
            for name in self._consumers
        )

    @property
    def reconnects(self) -> int:
        return _count(self._metrics, self._metrics.reconnects, component="worker")

    @property
    def bugs(self) -> int:
        return _count(self._metrics, self._metrics.bugs, component="worker")


class RelayStats:
    """A live view of a relay's counts, read from its :class:`Metrics` (the one source)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    @property
    def published(self) -> int:
        return _count(self._metrics, self._metrics.relay_published)

    @property
    def failed(self) -> int:
        """Messages the broker refused or returned (each rescheduled in the outbox)."""
        return _count(self._metrics, self._metrics.relay_failed)

    @property
    def batches(self) -> int:
        """Batches settled (claimed, published, committed): the batch histogram's count."""
        for family in self._metrics.relay_batch_seconds.collect():
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    return int(sample.value)
        return 0

    @property
    def reconnects(self) -> int:
        return _count(self._metrics, self._metrics.reconnects, component="relay")

    @property
    def bugs(self) -> int:
        return _count(self._metrics, self._metrics.bugs, component="relay")


def _count(metrics: Metrics, counter: Counter, **match: str) -> int:
    return int(metrics.totals(counter, **match).get("", 0))


class Handled(Protocol):
    """What :meth:`DeliveryLatency.observe` reads of a dispatch result."""

    @property
    def outcome(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def occurred_at(self) -> datetime | None: ...
    @property
    def replayed(self) -> bool: ...


class DeliveryLatency:
    """Observe end-to-end latency for a fixed set of consumers, on the worker's hot path.

    Every (consumer, delivery) child is bound at construction, so an observation is one
    dict lookup and one histogram update: no label resolution per message.
    """

    __slots__ = ("_children",)

    def __init__(self, histogram: Histogram, consumers: Iterable[str]) -> None:
        self._children = {
            (consumer, delivery): histogram.labels(consumer, delivery)
            for consumer in consumers
            for delivery in DELIVERIES
        }

    def observe(self, consumer: str, result: Handled) -> None:
        """Record *result* if its handler committed (outcome acked); ignore it otherwise."""
        if result.outcome != "acked" or result.occurred_at is None:
            return
        delivery = "replay" if result.replayed else "retry" if result.attempt > 1 else "first"
        seconds = time.time() - result.occurred_at.timestamp()
        self._children[consumer, delivery].observe(max(0.0, seconds))


def _check(value: str, allowed: frozenset[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")
