"""The shop's events: typed payloads with explicit topics (topics are identities)."""

from __future__ import annotations

import postroom


class OrderPlaced(postroom.Event, topic="shop.order-placed"):
    """A customer placed an order; published by the orders service with the order row."""

    order_id: int
    customer_email: str
    total_cents: int
    currency: str


class PaymentCompleted(postroom.Event, topic="shop.payment-completed"):
    """An order's payment went through; published by ``shop.payments``."""

    order_id: int
    payment_id: int
    amount_cents: int
    currency: str
    customer_email: str
