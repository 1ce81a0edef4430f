"""Watch the outbox backlog: due rows, the oldest one's age (the lag SLO) and errored rows.

Runs in every relay AND every worker process, on a connection of its own, one aggregate
query per interval: the lag must stay visible exactly when no relay runs (all crashed,
crash-looping, scaled to zero), and workers run beside the same database. The gauges
describe the whole outbox, whoever reports them, so every process reports the same
values: alert on ``max``, not ``sum``.

Lag counts what a relay failed to deliver, not only what waits for one: a row whose
publish failed (unroutable, refused) is rescheduled with a backoff, so it is not "due"
most of the time; its age is counted from when it was written, so a relay that is up but
cannot deliver shows as lag growing, never as an empty outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from postroom.metrics import Metrics
from postroom.settings import Settings
from postroom.tables import qualified

log = structlog.get_logger("postroom.backlog")

QUERY_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class OutboxState:
    """One look at the outbox."""

    pending: int
    """Rows due now (``available_at <= now()``) and not yet published."""
    oldest_age_seconds: float
    """How long the oldest due row has been due; 0 when none is."""
    errored: int
    """Rows whose last publish attempt failed, due or not."""
    unroutable: int = 0
    """Errored rows the broker returned because no queue is bound for their routing key."""


UNROUTABLE_PREFIX = "unroutable"
"""How the relay's error for a returned (unroutable) message starts (rabbit.Unroutable)."""


def _state_sql(schema: str) -> str:
    outbox = qualified(schema, "outbox")
    # Waiting since: when it became due, or, for a row whose publish failed (and was
    # pushed back), when it was written.
    since = "CASE WHEN last_error IS NULL THEN available_at ELSE created_at END"
    return (
        "SELECT count(*) FILTER (WHERE available_at <= now()) AS pending, "  # noqa: S608
        f"coalesce(extract(epoch FROM now() - min({since}) "
        "FILTER (WHERE available_at <= now() OR last_error IS NOT NULL)), 0)::float8 AS oldest, "
        "count(*) FILTER (WHERE last_error IS NOT NULL) AS errored, "
        "count(*) FILTER (WHERE starts_with(last_error, $1)) AS unroutable "
        f"FROM {outbox}"
    )


async def read_state(db: asyncpg.Connection[Any], schema: str) -> OutboxState:
    """Return the outbox of *schema* as seen by one query on *db*."""
    row = await db.fetchrow(_state_sql(schema), UNROUTABLE_PREFIX, timeout=QUERY_TIMEOUT)
    assert row is not None  # an aggregate always returns one row
    return OutboxState(
        pending=int(row["pending"]),
        oldest_age_seconds=max(0.0, float(row["oldest"])),
        errored=int(row["errored"]),
        unroutable=int(row["unroutable"]),
    )


async def watch(
    settings: Settings, metrics: Metrics, stop: asyncio.Event, *, hold_connection: bool = True
) -> None:
    """Refresh *metrics*' outbox gauges every ``settings.metrics_interval`` until *stop*.

    Never raises for a failed look: these are gauges, not the delivery path, so a database
    outage or a missing table is logged, the connection dropped and the look tried again
    next interval (``postroom_outbox_last_poll_timestamp_seconds`` then goes stale).
    With *hold_connection* False (workers: many replicas, each with its own pool) the
    connection is opened for each look and closed after it, so watching costs no
    connection slot between looks.
    """
    db: asyncpg.Connection[Any] | None = None
    try:
        while not stop.is_set():
            try:
                if db is None or db.is_closed():
                    db = await settings.database.connect(
                        application_name="postroom-backlog",
                        timeout=QUERY_TIMEOUT,
                        server_settings={"statement_timeout": str(int(QUERY_TIMEOUT * 1000))},
                    )
                state = await read_state(db, settings.schema_name)
                metrics.outbox_state(
                    pending=state.pending,
                    oldest_age_seconds=state.oldest_age_seconds,
                    errored=state.errored,
                    unroutable=state.unroutable,
                )
                if not hold_connection:
                    await _close(db)
                    db = None
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("backlog.poll_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
                await _close(db)
                db = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.metrics_interval)
    finally:
        await _close(db)


async def _close(db: asyncpg.Connection[Any] | None) -> None:
    if db is not None and not db.is_closed():
        with contextlib.suppress(Exception):  # a broken connection is gone either way
            await asyncio.wait_for(db.close(timeout=2), 3)
