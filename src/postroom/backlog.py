"""Watch the outbox backlog: due rows, the oldest one's age (the lag SLO) and errored rows.

Runs beside the relay on a connection of its own, one aggregate query per interval. The
gauges describe the whole outbox, whichever relay replica publishes it, so every replica
reports the same values: alert on ``max``, not ``sum``.
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


def _state_sql(schema: str) -> str:
    outbox = qualified(schema, "outbox")
    return (
        "SELECT count(*) FILTER (WHERE available_at <= now()) AS pending, "  # noqa: S608
        "coalesce(extract(epoch FROM now() - min(available_at) "
        "FILTER (WHERE available_at <= now())), 0)::float8 AS oldest, "
        "count(*) FILTER (WHERE last_error IS NOT NULL) AS errored "
        f"FROM {outbox}"
    )


async def read_state(db: asyncpg.Connection[Any], schema: str) -> OutboxState:
    """Return the outbox of *schema* as seen by one query on *db*."""
    row = await db.fetchrow(_state_sql(schema), timeout=QUERY_TIMEOUT)
    assert row is not None  # an aggregate always returns one row
    return OutboxState(
        pending=int(row["pending"]),
        oldest_age_seconds=max(0.0, float(row["oldest"])),
        errored=int(row["errored"]),
    )


async def watch(settings: Settings, metrics: Metrics, stop: asyncio.Event) -> None:
    """Refresh *metrics*' outbox gauges every ``settings.metrics_interval`` until *stop*.

    Never raises for a failed look: these are gauges, not the delivery path, so a database
    outage or a missing table is logged, the connection dropped and the look tried again
    next interval (``postroom_outbox_last_poll_timestamp_seconds`` then goes stale).
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
                )
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
