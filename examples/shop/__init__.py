"""The demo shop: an orders service and four consumers, wired through postroom.

``orders.place_order`` writes an order and its ``OrderPlaced`` event in one transaction.
The ``shop.payments`` consumer takes the payment and publishes ``PaymentCompleted``,
which fans out to ``shop.shipping``, ``shop.notifications`` and ``shop.analytics``.
Some handlers fail on purpose (see :mod:`examples.shop.consumers`) so that retries and
a dead letter show up. ``postroom demo`` (:mod:`examples.shop.run`) runs it all.
"""
