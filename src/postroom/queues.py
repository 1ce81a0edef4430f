"""Watch the consumers' queues: how many messages wait in each, seen from the broker.

Runs in every worker process on an AMQP connection of its own, one passive declare per
consumer queue per ``metrics_interval``. Together with the consumer outcome counters it
tells "idle" from "stuck": messages waiting while nothing is handled means the consumer
is stalled (a hung handler, a dead channel), which the worker's own counters cannot show.
Every worker of a router reports the same queues: alert on ``max``, not ``sum``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import structlog

from postroom import rabbit
from postroom.metrics import Metrics
from postroom.outage import is_outage
from postroom.settings import Settings

log = structlog.get_logger("postroom.queues")

LOOK_TIMEOUT = 10.0


async def watch(
    settings: Settings, queues: Sequence[str], metrics: Metrics, stop: asyncio.Event
) -> None:
    """Refresh ``postroom_queue_messages_ready`` for *queues* until *stop* is set.

    Never raises for a failed look (a broker outage, a queue not declared yet): the
    delivery path is the worker's, this is a gauge. The failure is logged once until a
    look succeeds again (an unexpected one at ERROR with its traceback), the connection
    dropped and the look tried again next interval; gauges of queues that could not be
    seen keep their last value.
    """
    connection: Any = None
    failing = False
    try:
        while not stop.is_set():
            try:
                if connection is None or connection.is_closed:
                    # settings.broker, not the bare URL: its TLS context verifies the
                    # broker with POSTROOM_AMQP_TLS_CA, as the worker's own connection does.
                    connection = await rabbit.connect(settings.broker, name="postroom-queues")
                depths = await asyncio.wait_for(
                    rabbit.ready_messages(connection, queues), LOOK_TIMEOUT
                )
                for queue, ready in depths.items():
                    metrics.queue_ready(queue, ready)
                failing = False
            except Exception as exc:
                if not failing:
                    error = f"{type(exc).__name__}: {exc}"[:200]
                    if is_outage(exc):
                        log.warning("queues.look_failed", error=error)
                    else:  # a bug, but in a gauge: say so loudly, keep the worker running
                        log.error("queues.look_failed", error=error, exc_info=exc)
                failing = True
                await _close(connection)
                connection = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.metrics_interval)
    finally:
        await _close(connection)


async def _close(connection: Any) -> None:
    if connection is not None:
        with contextlib.suppress(Exception):  # a broken connection is gone either way
            await asyncio.wait_for(connection.close(), 3)
