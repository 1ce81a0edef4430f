"""The shop's tables (SQLAlchemy 2 ORM), in a schema of their own: ``shop``.

Each consumer writes only its own table, as separate services would. Timestamps come
from ``clock_timestamp()`` at insert, i.e. inside the writing transaction just before
its commit, so the demo can measure end-to-end latency from the database's clock.

There is deliberately no unique constraint on ``order_id`` in the consumers' tables:
the demo's closing check counts rows per order to show that postroom's inbox alone
makes each effect happen once.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Identity, MetaData, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA = "shop"


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)


def _id() -> Mapped[int]:
    return mapped_column(BigInteger, Identity(), primary_key=True)


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.clock_timestamp())


def _order_id() -> Mapped[int]:
    return mapped_column(BigInteger, index=True)


class Order(Base):
    """Written by the orders service, together with its ``OrderPlaced`` event."""

    __tablename__ = "orders"

    id: Mapped[int] = _id()
    customer_email: Mapped[str] = mapped_column(Text)
    total_cents: Mapped[int]
    currency: Mapped[str] = mapped_column(Text)
    placed_at: Mapped[datetime] = _now()


class Payment(Base):
    """Written by ``shop.payments``, together with its ``PaymentCompleted`` event."""

    __tablename__ = "payments"

    id: Mapped[int] = _id()
    order_id: Mapped[int] = _order_id()
    amount_cents: Mapped[int]
    currency: Mapped[str] = mapped_column(Text)
    provider_ref: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int]
    paid_at: Mapped[datetime] = _now()


class Shipment(Base):
    """Written by ``shop.shipping``."""

    __tablename__ = "shipments"

    id: Mapped[int] = _id()
    order_id: Mapped[int] = _order_id()
    carrier: Mapped[str] = mapped_column(Text)
    tracking_number: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int]
    created_at: Mapped[datetime] = _now()


class Notification(Base):
    """Written by ``shop.notifications``: the "payment received" e-mail."""

    __tablename__ = "notifications"

    id: Mapped[int] = _id()
    order_id: Mapped[int] = _order_id()
    recipient: Mapped[str] = mapped_column(Text)
    template: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int]
    sent_at: Mapped[datetime] = _now()


class Counter(Base):
    """Written by ``shop.analytics``: running totals, where a duplicate would show at once."""

    __tablename__ = "analytics_counters"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = _now()
