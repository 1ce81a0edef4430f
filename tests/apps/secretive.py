"""The redaction tests' app: payments whose card details must never reach dead_letters.

The router masks the card number and drops the CVV and the ``authorization`` header of
every consumer's failed messages; ``pay.audit`` declares its own redaction instead (it
masks the ``x-api-token`` header and keeps the body as is).
"""

from __future__ import annotations

import postroom
from postroom.errors import Reject
from postroom.redaction import Redaction
from postroom.router import Context


class Card(postroom.Event, topic="pay.card"):
    number: str
    holder: str


class Charged(postroom.Event, topic="pay.charged"):
    id: int
    card: Card
    cvv: str
    amount: int


router = postroom.Router(
    redact=Redaction(mask=("card.number",), drop=("cvv",), drop_headers=("authorization",))
)


@router.consumer("pay.capture", Charged, max_attempts=1)
async def capture(event: Charged, ctx: Context) -> None:
    raise Reject(f"card {event.card.number} of charge {event.id} declined")


@router.consumer(
    "pay.audit", Charged, max_attempts=1, redact=Redaction(mask_headers=("x-api-token",))
)
async def record(event: Charged, ctx: Context) -> None:
    raise Reject(f"charge {event.id} not recorded")
