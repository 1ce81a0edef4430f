"""The shop's consumers: payments, then the fan-out of ``PaymentCompleted``.

Run them with ``postroom worker examples.shop.consumers:router``. Every handler writes
through ``ctx.session``, so its rows commit with postroom's inbox row (at most once per
message) and the events it publishes commit with them.

Failures on purpose, decided by the order id, so every run shows the same ones:

* every 10th order: the payment provider times out on the first attempt (one retry);
* every 25th order: the mail server is busy for two attempts (two retries);
* orders 13, 63, 113, ...: the card is declined, which no retry can fix, so the handler
  raises :class:`postroom.Reject` and the message becomes a dead letter at once.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert

import postroom
from examples.shop.events import OrderPlaced, PaymentCompleted
from examples.shop.models import Counter, Notification, Payment, Shipment

PAYMENTS = "shop.payments"
SHIPPING = "shop.shipping"
NOTIFICATIONS = "shop.notifications"
ANALYTICS = "shop.analytics"
CARRIERS = ("DHL", "UPS", "PostNL")

# Short backoff so the demo's retries finish in about a second; production would
# keep the defaults (1 s doubling up to 5 min).
BACKOFF = timedelta(milliseconds=200)
BACKOFF_CAP = timedelta(seconds=1)


class PaymentProviderTimeoutError(Exception):
    """The payment provider did not answer in time; worth another attempt."""


class MailServerBusyError(Exception):
    """The mail server answered 421 (try again later)."""


def card_declined(order_id: int) -> bool:
    """The demo's payment provider declines the card of orders 13, 63, 113, ..."""
    return order_id % 50 == 13


router = postroom.Router()


@router.consumer(PAYMENTS, OrderPlaced, max_attempts=3, backoff=BACKOFF, backoff_cap=BACKOFF_CAP)
async def take_payment(event: OrderPlaced, ctx: postroom.Context) -> None:
    """Charge the order and publish ``PaymentCompleted`` in the same transaction."""
    if card_declined(event.order_id):
        raise postroom.Reject(f"card declined for order {event.order_id}")
    if event.order_id % 10 == 0 and ctx.attempt == 1:
        raise PaymentProviderTimeoutError(f"no answer for order {event.order_id} within 2 s")
    payment = Payment(
        order_id=event.order_id,
        amount_cents=event.total_cents,
        currency=event.currency,
        provider_ref=f"ch_{ctx.message.message_id.hex[:16]}",
        attempt=ctx.attempt,
    )
    ctx.session.add(payment)
    await ctx.session.flush()  # assigns payment.id
    completed = PaymentCompleted(
        order_id=event.order_id,
        payment_id=payment.id,
        amount_cents=event.total_cents,
        currency=event.currency,
        customer_email=event.customer_email,
    )
    await ctx.publish(completed, key=f"order-{event.order_id}")


@router.consumer(SHIPPING, PaymentCompleted, backoff=BACKOFF, backoff_cap=BACKOFF_CAP)
async def create_shipment(event: PaymentCompleted, ctx: postroom.Context) -> None:
    """Book a parcel with a carrier for the paid order."""
    carrier = CARRIERS[event.order_id % len(CARRIERS)]
    ctx.session.add(
        Shipment(
            order_id=event.order_id,
            carrier=carrier,
            tracking_number=f"{carrier[:2].upper()}{event.order_id:010d}",
            attempt=ctx.attempt,
        )
    )


@router.consumer(
    NOTIFICATIONS, PaymentCompleted, max_attempts=4, backoff=BACKOFF, backoff_cap=BACKOFF_CAP
)
async def send_receipt(event: PaymentCompleted, ctx: postroom.Context) -> None:
    """E-mail the customer a receipt."""
    if event.order_id % 25 == 0 and ctx.attempt <= 2:
        raise MailServerBusyError("421 4.3.2 service not available, try again later")
    ctx.session.add(
        Notification(
            order_id=event.order_id,
            recipient=event.customer_email,
            template="payment-received",
            attempt=ctx.attempt,
        )
    )


@router.consumer(ANALYTICS, PaymentCompleted, backoff=BACKOFF, backoff_cap=BACKOFF_CAP)
async def count_sale(event: PaymentCompleted, ctx: postroom.Context) -> None:
    """Add the sale to running totals; ``handler_attempts`` lets the demo count retries."""
    increments = {
        "handler_attempts": ctx.attempt,
        "orders_paid": 1,
        "revenue_cents": event.amount_cents,
    }
    statement = insert(Counter).values(
        [{"name": name, "value": value} for name, value in sorted(increments.items())]
    )
    statement = statement.on_conflict_do_update(
        index_elements=[Counter.name],
        set_={
            "value": Counter.value + statement.excluded.value,
            "updated_at": func.clock_timestamp(),
        },
    )
    await ctx.session.execute(statement)
