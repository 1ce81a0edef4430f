"""The subscriber: one AMQP channel of a worker, consuming and settling deliveries.

With :mod:`postroom.rabbit`, the only modules that import the broker client. The worker
sees :class:`~postroom.message.Delivery` objects and delivery tags, never an AMQP
message object; it maps outcomes to :meth:`Subscriber.ack` and
:meth:`Subscriber.reject` and closes the subscriber to give back what it still holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiormq
import structlog
from aio_pika.abc import AbstractChannel

from postroom.message import Delivery

_log = structlog.get_logger("postroom.subscriber")

Deliver = Callable[[Delivery, int], None]
"""Called with each delivery (converted at the edge) and its delivery tag."""


class Subscriber:
    """One AMQP channel of a worker: QoS, consume, coalesced acks, rejects, close.

    Consumes through the aiormq channel under aio-pika, so a delivery costs no
    aio-pika message object: it is converted once, here, into a broker-free
    :class:`~postroom.message.Delivery`. Settlements are sent once per event-loop
    turn, in order: rejects first, then the run of acked tags from the oldest
    unsettled delivery as ONE ``basic.ack(multiple=True)``, then any acked tag past a
    gap (a delivery still in hand) on its own. A tag is never covered by a multiple
    ack unless it was acked itself.
    """

    _ACKED = 1
    _REJECT = 2
    _REQUEUE = 3

    def __init__(self, channel: AbstractChannel, raw: Any) -> None:
        self._channel = channel
        self._raw = raw
        self._open: dict[int, int] = {}  # tag -> 0 in hand | _ACKED | _REJECT | _REQUEUE
        self._flushing: asyncio.Future[None] | None = None
        self._dirty = False

    @classmethod
    async def open(
        cls,
        channel: AbstractChannel,
        *,
        prefetch: int,
        on_close: Callable[[BaseException | None], None],
    ) -> Subscriber:
        """Consume on *channel* (from ``rabbit.open_channel``) with *prefetch*;
        *on_close* is called when it closes.

        A consumer the broker cancels (``basic.cancel``: its queue deleted, or gone from
        under it) counts as a closed channel too: aiormq would only log it, and the
        channel would stay open with nothing consumed from that queue.
        """
        channel.close_callbacks.add(lambda _sender, exc=None, *_: on_close(exc))
        await channel.set_qos(prefetch_count=prefetch)
        raw = await channel.get_underlay_channel()
        raw.on_consumer_cancel_callbacks.add(lambda frame: on_close(_cancelled(frame)))
        return cls(channel, raw)

    @property
    def is_open(self) -> bool:
        return not self._channel.is_closed

    async def consume(self, queue: str, deliver: Deliver) -> str:
        """Start consuming *queue*; return the consumer tag (for :meth:`cancel`)."""
        opened = self._open

        async def on_message(message: Any) -> None:
            tag: int = message.delivery.delivery_tag
            opened[tag] = 0
            deliver(_delivery(message), tag)

        ok = await self._raw.basic_consume(queue, on_message)
        tag: str = ok.consumer_tag
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        """Stop deliveries to *consumer_tag*; those in hand stay in hand."""
        await self._raw.basic_cancel(consumer_tag)

    def ack(self, tag: int) -> None:
        """Ack *tag* (sent with the next flush)."""
        self._settle(tag, self._ACKED)

    def reject(self, tag: int, *, requeue: bool) -> None:
        """Reject *tag*, back to its queue if *requeue* (sent with the next flush)."""
        self._settle(tag, self._REQUEUE if requeue else self._REJECT)

    def _settle(self, tag: int, how: int) -> None:
        if self._open.get(tag) == 0:
            self._open[tag] = how
            self._dirty = True
            if self._flushing is None:
                self._flushing = asyncio.ensure_future(self._flush())

    async def flush(self) -> None:
        """Send the settlements made so far (:meth:`close` does it too)."""
        if self._flushing is not None:
            await asyncio.shield(self._flushing)

    async def _flush(self) -> None:
        # One flush at a time: a reject must reach the wire before any multiple ack
        # whose range covers its tag.
        opened, raw = self._open, self._raw
        try:
            while self._dirty:
                await asyncio.sleep(0)  # let this loop turn's settlements join
                self._dirty = False
                for tag, how in [(t, h) for t, h in opened.items() if h > self._ACKED]:
                    del opened[tag]
                    await raw.basic_reject(tag, requeue=how == self._REQUEUE)
                last = None
                for tag, how in opened.items():
                    if how != self._ACKED:
                        break
                    last = tag
                if last is not None:
                    for tag in [t for t in opened if t <= last]:
                        del opened[tag]
                    await raw.basic_ack(last, multiple=True)
                for tag in [t for t, h in opened.items() if h == self._ACKED]:
                    del opened[tag]
                    await raw.basic_ack(tag)
        except Exception as exc:  # channel gone: the broker returns the unacked itself
            _log.debug("subscriber.flush_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._flushing = None

    async def close(self) -> None:
        """Flush, then close the channel (which returns every delivery still in hand)."""
        await self.flush()
        self._open.clear()
        if not self._channel.is_closed:
            await self._channel.close()


def _cancelled(frame: Any) -> BaseException:
    return aiormq.exceptions.AMQPChannelError(
        f"consumer {frame.consumer_tag} cancelled by the broker"
    )


def _delivery(message: Any) -> Delivery:
    properties = message.header.properties
    return Delivery(
        body=message.body,
        message_id=properties.message_id,
        type=properties.message_type,
        timestamp=properties.timestamp,
        content_type=properties.content_type,
        correlation_id=properties.correlation_id,
        headers=properties.headers or {},
        redelivered=bool(message.delivery.redelivered),
    )
