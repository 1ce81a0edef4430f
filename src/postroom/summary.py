"""The INFO summary line a worker or relay logs once per ``log_interval``.

A healthy worker logs nothing per message at INFO (that would cost more than some
handlers), so without this line it looks idle. The counts are read from the process's
own :class:`~postroom.metrics.Metrics`, the numbers ``/metrics`` serves, so the line and
the dashboards never disagree: per consumer handled, duplicates, retries and dead; for a
relay, events relayed, unroutable and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from postroom.metrics import Metrics

log = structlog.get_logger("postroom.summary")

_WORDS = {"acked": "handled", "duplicate": "duplicates", "retry": "retries", "dead": "dead"}
Snapshot = dict[tuple[str, ...], float]


def snapshot(metrics: Metrics) -> Snapshot:
    """Return the summed counters: (consumer, outcome) and ("relay", what) keys."""
    totals: Snapshot = {}
    families = (
        (metrics.consumer_messages, None),
        (metrics.relay_published, "relayed"),
        (metrics.relay_unroutable, "unroutable"),
        (metrics.relay_dropped, "dropped"),
    )
    for counter, relay_word in families:
        for family in counter.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                if relay_word is None:
                    word = _WORDS[sample.labels["outcome"]]
                    key: tuple[str, ...] = (sample.labels["consumer"], word)
                else:
                    key = ("relay", relay_word)
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def describe(
    before: Snapshot, after: Snapshot, *, consumers: tuple[str, ...], relay: bool
) -> tuple[str, dict[str, dict[str, int]]]:
    """Return the readable line and its structured form for the changes from *before*."""
    delta = {key: int(after.get(key, 0) - before.get(key, 0)) for key in after.keys() | before}
    fields: dict[str, dict[str, int]] = {}
    parts = []
    for name in consumers:
        counts = {word: delta.get((name, word), 0) for word in _WORDS.values()}
        fields[name] = counts
        parts.append(f"{name}: " + ", ".join(f"{n} {word}" for word, n in counts.items()))
    if relay:
        counts = {w: delta.get(("relay", w), 0) for w in ("relayed", "unroutable", "dropped")}
        fields["relay"] = counts
        parts.append("relay: " + ", ".join(f"{n} {word}" for word, n in counts.items()))
    return "; ".join(parts), fields


async def watch(
    metrics: Metrics,
    stop: asyncio.Event,
    *,
    interval: float,
    consumers: tuple[str, ...] = (),
    relay: bool = False,
) -> None:
    """Log ``postroom.summary`` every *interval* seconds until *stop* is set, and at the end."""
    before = snapshot(metrics)
    final = False
    while not final:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        final = stop.is_set()
        after = snapshot(metrics)
        if final and after == before:
            return
        text, fields = describe(before, after, consumers=consumers, relay=relay)
        log.info("postroom.summary", summary=text, interval_seconds=interval, counts=fields)
        before = after
