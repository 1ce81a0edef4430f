"""How far behind the outbox is: due, scheduled and errored rows per topic, the lag.

What ``postroom outbox status`` (and the console) show: one consistent snapshot of the
whole outbox, for a person. The relay's gauges (:mod:`postroom.backlog`) watch the same
numbers continuously.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from postroom.tables import outbox, schema_map


@dataclass(frozen=True, slots=True)
class TopicLag:
    """The outbox rows of one topic."""

    topic: str
    due: int
    """Waiting to be published now."""
    scheduled: int
    """Held back until later: retries in backoff, delayed sends, failed publishes."""
    errored: int
    """Whose last publish attempt failed (see ``last_error``)."""
    oldest_due_seconds: float
    """How long the oldest due row has been waiting; the relay's lag."""


@dataclass(frozen=True, slots=True)
class FailedRow:
    """An outbox row whose last publish failed."""

    id: int
    topic: str
    routing_key: str
    attempts: int
    last_error: str
    available_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """The outbox at one moment: totals, per topic, and the latest publish errors."""

    due: int
    scheduled: int
    errored: int
    direct: int
    """Rows addressed to one consumer's queue: retries and replays."""
    oldest_due_seconds: float
    topics: tuple[TopicLag, ...]
    failures: tuple[FailedRow, ...]

    def as_json(self) -> dict[str, Any]:
        shown = asdict(self)
        for failure in shown["failures"]:
            failure["available_at"] = failure["available_at"].isoformat()
        return shown


async def outbox_status(engine: AsyncEngine, schema: str, *, failures: int = 5) -> OutboxStatus:
    """Look at the whole outbox in one snapshot; the *failures* most recent errored rows."""
    c = outbox.c
    due = c.available_at <= func.now()
    by_topic = (
        select(
            c.topic,
            func.count().filter(due).label("due"),
            func.count().filter(~due).label("scheduled"),
            func.count().filter(c.last_error.is_not(None)).label("errored"),
            func.count().filter(c.exchange == "").label("direct"),
            func.coalesce(
                func.extract("epoch", func.now() - func.min(c.available_at).filter(due)), 0
            ).label("oldest"),
        )
        .group_by(c.topic)
        .order_by(func.count().filter(due).desc(), c.topic)
    )
    latest = (
        select(c.id, c.topic, c.routing_key, c.attempts, c.last_error, c.available_at)
        .where(c.last_error.is_not(None))
        .order_by(c.id.desc())
        .limit(failures)
    )
    translate = {"schema_translate_map": schema_map(schema)}
    async with engine.connect() as connection, connection.begin():
        await connection.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        rows = (await connection.execute(by_topic, execution_options=translate)).all()
        failed = (await connection.execute(latest, execution_options=translate)).all()
    topics = tuple(
        TopicLag(r.topic, r.due, r.scheduled, r.errored, max(0.0, float(r.oldest))) for r in rows
    )
    return OutboxStatus(
        due=sum(t.due for t in topics),
        scheduled=sum(t.scheduled for t in topics),
        errored=sum(t.errored for t in topics),
        direct=sum(r.direct for r in rows),
        oldest_due_seconds=max((t.oldest_due_seconds for t in topics), default=0.0),
        topics=topics,
        failures=tuple(FailedRow(**r._mapping) for r in failed),
    )
