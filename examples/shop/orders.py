"""The orders service: placing an order writes the order and its event in one commit."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

import postroom
from examples.shop.events import OrderPlaced
from examples.shop.models import Order


async def place_order(
    session: AsyncSession,
    outbox: postroom.Outbox,
    *,
    customer_email: str,
    total_cents: int,
    currency: str = "EUR",
) -> int:
    """Place an order and return its id.

    The order row and its ``OrderPlaced`` outbox row commit together, or neither does:
    no order without its event, no event for an order that was rolled back. *session*
    must not be in a transaction; this function is one.
    """
    async with session.begin():
        order = Order(
            customer_email=customer_email,
            total_cents=total_cents,
            currency=currency,
        )
        session.add(order)
        await session.flush()  # assigns order.id
        event = OrderPlaced(
            order_id=order.id,
            customer_email=customer_email,
            total_cents=total_cents,
            currency=currency,
        )
        await outbox.publish(session, event, key=f"order-{order.id}")
    return order.id
