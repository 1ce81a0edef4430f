"""A tiny service written the way a team would: its own model, write path and consumer.

tests/test_testing.py tests it with :mod:`postroom.testing` and nothing else of postroom's
internals. The wallet consumes another service's ``OrderCancelled`` and credits the
refund; a refund for a wallet that does not exist yet is retried (it may be opened by a
message still on its way), and a non-positive refund is rejected outright.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import postroom


class Base(DeclarativeBase):
    pass


class Wallet(Base):
    __tablename__ = "wallet_wallets"

    customer_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance_cents: Mapped[int] = mapped_column(default=0)


class OrderCancelled(postroom.Event, topic="shop.order-cancelled"):
    """Published by the shop; the wallet refunds it."""

    order_id: int
    customer_id: int
    refund_cents: int


class WalletOpened(postroom.Event, topic="wallet.opened"):
    customer_id: int


class WalletCredited(postroom.Event, topic="wallet.credited"):
    customer_id: int
    cents: int
    balance_cents: int


async def open_wallet(session: AsyncSession, outbox: postroom.Outbox, customer_id: int) -> Wallet:
    """Open a wallet and announce it, in the caller's transaction."""
    wallet = Wallet(customer_id=customer_id, balance_cents=0)
    session.add(wallet)
    await outbox.publish(
        session, WalletOpened(customer_id=customer_id), key=f"wallet-{customer_id}"
    )
    return wallet


router = postroom.Router()


@router.consumer("wallet.refund", OrderCancelled, max_attempts=3, publishes=(WalletCredited,))
async def refund(event: OrderCancelled, ctx: postroom.Context) -> None:
    if event.refund_cents <= 0:
        raise postroom.Reject(f"refund of {event.refund_cents} cents for order {event.order_id}")
    wallet = await ctx.session.get(Wallet, event.customer_id, with_for_update=True)
    if wallet is None:
        raise LookupError(f"customer {event.customer_id} has no wallet yet")
    wallet.balance_cents += event.refund_cents
    await ctx.publish(
        WalletCredited(
            customer_id=wallet.customer_id,
            cents=event.refund_cents,
            balance_cents=wallet.balance_cents,
        ),
        key=f"wallet-{wallet.customer_id}",
    )
