"""What the demo reads back from the database: progress while it runs, a summary after.

Everything is counted from committed rows, never from the processes' own counters:
postroom's inbox says what each consumer handled, its dead letters what failed, and the
shop's tables what actually happened (with the attempt that succeeded and a timestamp).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter as Tally
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import ColumnElement, SQLColumnExpression, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from examples.shop.consumers import ANALYTICS, NOTIFICATIONS, PAYMENTS, SHIPPING
from examples.shop.events import OrderPlaced, PaymentCompleted
from examples.shop.models import Counter, Notification, Order, Payment, Shipment
from postroom.router import Router
from postroom.tables import dead_letters, inbox, outbox, schema_map


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Where the run stands: enough to draw progress bars and to know when it is done."""

    placed: int
    published: dict[str, int]
    """Events written per topic: one ``OrderPlaced`` per order, one ``PaymentCompleted``
    per payment (each commits with the row that caused it)."""
    handled: dict[str, int]
    """Messages each consumer handled: its inbox rows."""
    dead: dict[str, int]
    """Live dead letters per consumer."""
    pending: int
    """Shop messages still in the outbox: not yet relayed, or retries not yet due."""

    def done(self, consumer: str) -> int:
        return self.handled.get(consumer, 0) + self.dead.get(consumer, 0)

    def behind(self, router: Router) -> dict[str, tuple[int, int]]:
        """Consumers that have not finished what was published to them: (done, expected)."""
        lagging = {}
        for consumer in router:
            expected = sum(self.published.get(topic, 0) for topic in consumer.topics)
            if self.done(consumer.name) < expected:
                lagging[consumer.name] = (self.done(consumer.name), expected)
        return lagging

    def settled(self, router: Router, orders: int) -> bool:
        return self.placed >= orders and self.pending == 0 and not self.behind(router)


@contextlib.asynccontextmanager
async def reading(engine: AsyncEngine, schema: str) -> AsyncIterator[AsyncConnection]:
    """A connection whose statements find postroom's tables in *schema*."""
    async with engine.connect() as connection:
        await connection.execution_options(schema_translate_map=schema_map(schema))
        yield connection


async def snapshot(connection: AsyncConnection, router: Router) -> Snapshot:
    """Read the current state; *connection* comes from :func:`reading`."""
    names = [consumer.name for consumer in router]
    topics = sorted({topic for consumer in router for topic in consumer.topics})
    placed, paid = (
        await connection.execute(
            select(
                select(func.count()).select_from(Order).scalar_subquery(),
                select(func.count()).select_from(Payment).scalar_subquery(),
            )
        )
    ).one()
    handled = await _per_consumer(connection, inbox.c.consumer, names)
    dead = await _per_consumer(
        connection, dead_letters.c.consumer, names, dead_letters.c.status == "dead"
    )
    pending = await connection.scalar(
        select(func.count()).select_from(outbox).where(outbox.c.topic.in_(topics))
    )
    return Snapshot(
        placed=placed,
        published={OrderPlaced.topic: placed, PaymentCompleted.topic: paid},
        handled=handled,
        dead=dead,
        pending=pending or 0,
    )


async def _per_consumer(
    connection: AsyncConnection,
    consumer: ColumnElement[str],
    names: list[str],
    *where: ColumnElement[bool],
) -> dict[str, int]:
    """Count rows per consumer, in the router's order (consumers with none are left out)."""
    statement = select(consumer, func.count()).where(consumer.in_(names), *where).group_by(consumer)
    counts: dict[str, int] = dict((await connection.execute(statement)).tuples().all())
    return {name: counts[name] for name in names if name in counts}


@dataclass(frozen=True, slots=True)
class DeadLetterLine:
    consumer: str
    reason: str
    error: str
    attempts: int
    order_id: int | None


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Summary:
    """The closing numbers of a run; :meth:`as_dict` is what ``--json`` prints."""

    orders: int
    rate: float
    """Orders placed per second as asked; 0: as fast as possible (a burst)."""
    published: dict[str, int]
    relayed: int
    handled: dict[str, int]
    retries: dict[str, int]
    dead_letters: list[DeadLetterLine]
    seconds: float
    orders_per_second: float
    messages_per_second: float
    latency_ms: dict[str, float]
    """End to end: the order's insert to the last of its payment, shipment and receipt."""
    payment_latency_ms: dict[str, float]
    """First hop: the order's insert to its payment."""
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        shown = asdict(self)
        shown["ok"] = self.ok
        return shown

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)


async def summarize(
    connection: AsyncConnection, router: Router, *, orders: int, rate: float
) -> Summary:
    """Count and check everything that happened in this run of *orders* orders."""
    state = await snapshot(connection, router)
    letters = await _dead_letters(connection, [consumer.name for consumer in router])
    retries = await _retries(connection, letters)
    total_retries = sum(retries.values())
    published = sum(state.published.values())
    first, last = await _span(connection)
    seconds = max((last - first).total_seconds(), 1e-6) if first and last else 0.0
    handled_total = sum(state.handled.values())
    return Summary(
        orders=state.placed,
        rate=rate,
        published=state.published,
        relayed=published + total_retries - state.pending,
        handled=state.handled,
        retries=retries,
        dead_letters=letters,
        seconds=round(seconds, 3),
        orders_per_second=round(state.placed / seconds, 1) if seconds else 0.0,
        messages_per_second=round(handled_total / seconds, 1) if seconds else 0.0,
        latency_ms=await _latency(
            connection, func.greatest(Shipment.created_at, Notification.sent_at), fan_out=True
        ),
        payment_latency_ms=await _latency(connection, Payment.paid_at, fan_out=False),
        checks=await _checks(connection, state, letters, orders),
    )


async def _dead_letters(connection: AsyncConnection, names: list[str]) -> list[DeadLetterLine]:
    rows = await connection.execute(
        select(
            dead_letters.c.consumer,
            dead_letters.c.reason,
            dead_letters.c.error_type,
            dead_letters.c.error_message,
            dead_letters.c.attempts,
            dead_letters.c.body,
        )
        .where(dead_letters.c.consumer.in_(names), dead_letters.c.status == "dead")
        .order_by(dead_letters.c.id)
    )
    return [
        DeadLetterLine(consumer, reason, f"{error_type}: {message}", attempts, _order_id(body))
        for consumer, reason, error_type, message, attempts, body in rows.tuples()
    ]


def _order_id(body: bytes) -> int | None:
    try:
        value = json.loads(body).get("order_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


async def _retries(connection: AsyncConnection, letters: list[DeadLetterLine]) -> dict[str, int]:
    """Retries per consumer: the attempts before the one that succeeded, or before death."""
    extra_attempts = {
        PAYMENTS: func.sum(Payment.attempt - 1),
        SHIPPING: func.sum(Shipment.attempt - 1),
        NOTIFICATIONS: func.sum(Notification.attempt - 1),
    }
    retries = {
        name: int(await connection.scalar(select(expr)) or 0)
        for name, expr in extra_attempts.items()
    }
    counters = await _counters(connection)
    retries[ANALYTICS] = counters.get("handler_attempts", 0) - counters.get("orders_paid", 0)
    for letter in letters:
        retries[letter.consumer] = retries.get(letter.consumer, 0) + letter.attempts - 1
    return retries


async def _counters(connection: AsyncConnection) -> dict[str, int]:
    rows = await connection.execute(select(Counter.name, Counter.value))
    return {name: value for name, value in rows.tuples()}


async def _span(connection: AsyncConnection) -> tuple[datetime | None, datetime | None]:
    """From the first order placed to the last effect or dead letter committed."""
    first = await connection.scalar(select(func.min(Order.placed_at)))
    lasts = [
        await connection.scalar(select(func.max(column)))
        for column in (
            Payment.paid_at,
            Shipment.created_at,
            Notification.sent_at,
            Counter.updated_at,
        )
    ]
    lasts.append(await connection.scalar(select(func.max(dead_letters.c.last_failed_at))))
    known = [value for value in lasts if value is not None]
    return first, max(known) if known else None


async def _latency(
    connection: AsyncConnection, done_at: SQLColumnExpression[datetime], *, fan_out: bool
) -> dict[str, float]:
    millis = func.extract("epoch", done_at - Order.placed_at) * 1000
    statement = select(
        func.percentile_cont(0.5).within_group(millis),
        func.percentile_cont(0.99).within_group(millis),
        func.max(millis),
    ).select_from(Order)
    statement = statement.join(Payment, Payment.order_id == Order.id)
    if fan_out:
        statement = statement.join(Shipment, Shipment.order_id == Order.id).join(
            Notification, Notification.order_id == Order.id
        )
    p50, p99, worst = (await connection.execute(statement)).one()
    return {
        "p50": round(float(p50 or 0), 1),
        "p99": round(float(p99 or 0), 1),
        "max": round(float(worst or 0), 1),
    }


async def _checks(
    connection: AsyncConnection, state: Snapshot, letters: list[DeadLetterLine], orders: int
) -> list[Check]:
    async def order_ids(column: Any) -> list[int]:
        return list((await connection.scalars(select(column))).all())

    dead_orders: dict[str, set[int | None]] = {}
    for letter in letters:
        dead_orders.setdefault(letter.consumer, set()).add(letter.order_id)
    placed = await order_ids(Order.id)
    paid = await order_ids(Payment.order_id)
    expected_paid = set(placed) - dead_orders.get(PAYMENTS, set())
    counters = await _counters(connection)
    revenue = await connection.scalar(select(func.coalesce(func.sum(Payment.amount_cents), 0)))
    checks = [
        Check("all orders placed", len(placed) == orders, f"{len(placed)} of {orders}"),
        _once("every order paid once, or its payment dead-lettered", paid, expected_paid),
        _once(
            "every payment shipped once",
            await order_ids(Shipment.order_id),
            set(paid) - dead_orders.get(SHIPPING, set()),
        ),
        _once(
            "every payment notified once",
            await order_ids(Notification.order_id),
            set(paid) - dead_orders.get(NOTIFICATIONS, set()),
        ),
        Check(
            "every payment counted once by analytics",
            counters.get("orders_paid", 0) == len(paid)
            and counters.get("revenue_cents", 0) == revenue,
            f"orders_paid={counters.get('orders_paid', 0)} for {len(paid)} payments",
        ),
        Check("outbox drained", state.pending == 0, f"{state.pending} messages left"),
    ]
    return checks


def _once(name: str, seen: Iterable[int], expected: set[int]) -> Check:
    tally = Tally(seen)
    twice = sorted(order for order, count in tally.items() if count > 1)
    missing = sorted(expected - tally.keys())
    extra = sorted(tally.keys() - expected)
    problems = [
        f"{label}: {_ids(ids)}"
        for label, ids in (("twice", twice), ("missing", missing), ("unexpected", extra))
        if ids
    ]
    return Check(name, not problems, "; ".join(problems) or f"{len(expected)} orders")


def _ids(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:10])
    return shown + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def render(summary: Summary, console: Console) -> None:
    """Print *summary* as a short table, then the checks."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    published = sum(summary.published.values())
    retries = sum(summary.retries.values())
    pace = f"{summary.rate:g} per second" if summary.rate else "as fast as possible"
    table.add_row("orders placed", f"{summary.orders}  ({pace})")
    table.add_row(
        "events published",
        f"{published}  ({_pairs(summary.published)})",
    )
    table.add_row("events relayed", f"{summary.relayed}  ({published} events + {retries} retries)")
    table.add_row("handled per consumer", _pairs(summary.handled))
    table.add_row(
        "retries", f"{retries}  ({_pairs({k: v for k, v in summary.retries.items() if v})})"
    )
    table.add_row("dead letters", str(len(summary.dead_letters)))
    for letter in summary.dead_letters:
        _, _, message = letter.error.partition(": ")  # the type is in the reason, mostly
        tries = f"{letter.attempts} attempt{'s' if letter.attempts != 1 else ''}"
        table.add_row(
            "",
            f"[red]{letter.consumer}[/] order {letter.order_id}, {letter.reason} after {tries}: "
            f"{escape(message or letter.error)}",
        )
    table.add_row(
        "throughput",
        f"{summary.orders_per_second} orders/s, {summary.messages_per_second} messages handled/s "
        f"({summary.seconds:.2f} s from first order to last effect)",
    )
    table.add_row("latency, order → paid", _ms(summary.payment_latency_ms))
    table.add_row(
        "latency, end to end", _ms(summary.latency_ms) + "  (order → shipped and e-mailed)"
    )
    if not summary.rate:
        table.add_row("", "[dim]a burst: latency includes time queued behind it; try --rate 20[/]")
    console.print(table)
    console.print()
    for check in summary.checks:
        mark = "[green]✓[/]" if check.ok else "[red]✗[/]"
        console.print(f"{mark} {check.name}  [dim]{check.detail}[/]")


def _pairs(values: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in values.items()) or "none"


def _ms(values: dict[str, float]) -> str:
    return f"p50 {values['p50']:.0f} ms, p99 {values['p99']:.0f} ms, max {values['max']:.0f} ms"
