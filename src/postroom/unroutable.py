"""What the relay does with an event the broker could not route or would not take.

The policy (docs/operations.md, "Events nobody consumes yet"): an event that no queue is
bound for stays in the outbox and is tried again with a growing delay (the relay's
reschedule, capped at 5 minutes), because the usual cause is a consumer not deployed
yet, whose queue will exist soon. The relay says so once per topic per
``log_interval`` (with how many failures it saw since), not once per row and retry, and
counts every one in ``postroom_relay_unroutable_total{topic}``. Topics a deployment
names in ``POSTROOM_UNROUTABLE_DROP`` are the exception: their unroutable events are
deleted on purpose and counted in ``postroom_relay_dropped_total{topic}``. Retries and
replays (addressed to one consumer's queue) are never dropped: a missing queue there
is a consumer that was renamed or removed, for a person to decide (``postroom outbox``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

log = structlog.get_logger("postroom.relay")


class Counts(Protocol):
    """Where the policy counts; :class:`postroom.metrics.Metrics` implements it."""

    def relay_unroutable_count(self, topic: str, count: int) -> None: ...

    def relay_dropped_count(self, topic: str, count: int) -> None: ...


def topic_patterns(spec: str) -> re.Pattern[str] | None:
    """Compile ``loyalty.*, shop.audit`` into one pattern; ``*`` matches any characters."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        return None
    alternatives = "|".join(".*".join(map(re.escape, part.split("*"))) for part in parts)
    return re.compile(f"(?:{alternatives})")


@dataclass
class _Quiet:
    last_warned: float
    since: int = 0


@dataclass
class UnroutablePolicy:
    """Decide what becomes of failed publishes, and say it once per topic per interval."""

    drop: re.Pattern[str] | None
    interval: float
    counts: Counts | None = None
    clock: Callable[[], float] = time.monotonic
    _quiet: dict[str, _Quiet] = field(default_factory=dict)

    def drops(self, *, topic: str, exchange: str | None, unroutable: bool) -> bool:
        """Return True if this failed row is deleted on purpose instead of rescheduled.

        Only unroutable events published to the events exchange (``exchange`` None) of a
        topic the deployment named; never a retry, a replay or a refused message.
        """
        return (
            unroutable
            and exchange is None
            and self.drop is not None
            and self.drop.fullmatch(topic) is not None
        )

    def failed(
        self,
        *,
        topic: str,
        unroutable: bool,
        dropped: bool,
        error: str,
        retry_in: float,
        queue: str | None = None,
    ) -> None:
        """Count one failed publish of *topic*; log a warning if the topic was quiet.

        *queue* is set for a retry or replay, addressed to that consumer's queue alone.
        """
        if self.counts is not None:
            if unroutable:
                self.counts.relay_unroutable_count(topic, 1)
            if dropped:
                self.counts.relay_dropped_count(topic, 1)
        now = self.clock()
        quiet = self._quiet.get(topic)
        if quiet is not None and now - quiet.last_warned < self.interval:
            quiet.since += 1
            return
        suppressed = quiet.since if quiet is not None else 0
        self._quiet[topic] = _Quiet(last_warned=now)
        if dropped:
            log.info(
                "relay.unroutable_dropped",
                topic=topic,
                failures_since_last_line=suppressed,
                policy="POSTROOM_UNROUTABLE_DROP",
            )
            return
        log.warning(
            "relay.unroutable" if unroutable else "relay.publish_failed",
            topic=topic,
            error=error[:200],
            retry_in_seconds=retry_in,
            failures_since_last_line=suppressed,
            hint=_hint(topic, unroutable=unroutable, queue=queue),
        )


def _hint(topic: str, *, unroutable: bool, queue: str | None) -> str:
    if not unroutable:
        return "the broker refused the message; it is tried again"
    if queue is not None:
        return (
            f"a retry or replay for consumer {queue!r}, whose queue does not exist: deploy "
            f"it, or see `postroom outbox list --routing-key {queue}`"
        )
    return (
        "no queue is bound for this topic yet: the events wait in the outbox "
        f"(`postroom outbox list --topic {topic}`) until a consumer declares its queue"
    )
