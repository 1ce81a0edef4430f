"""Regression tests for bugs the fault scenarios (tests/test_faults.py) found.

Each test pins one bug down deterministically, without the randomness of a scenario.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from postroom import rabbit
from postroom.outage import is_outage
from tests.faults import servers
from tests.helpers import eventually


async def test_publishing_on_a_channel_the_broker_closed_is_an_outage(amqp_url, names):
    """Bug: after `close_all_connections` between two batches the relay exited with
    aiormq's ChannelInvalidStateError (a RuntimeError, not an AMQPError), instead of
    reconnecting like for any other broker outage."""
    connection = await rabbit.connect(amqp_url, name="postroom-test")
    try:
        await rabbit.declare_exchange(connection, f"ev.{names}")
        publisher = await rabbit.ConfirmingPublisher.open(connection)
        await servers.close_broker_connections(amqp_url)
        await eventually(lambda: not publisher.is_open, timeout=15)
        message = rabbit.Outgoing(
            exchange=f"ev.{names}",
            routing_key="t.x",
            body=b"{}",
            message_id="00000000-0000-7000-8000-000000000001",
            topic="t.x",
            timestamp=datetime.now(UTC),
            content_type="application/json",
            correlation_id=None,
            headers={},
        )
        with pytest.raises(Exception) as caught:
            await publisher.publish_many([message])
        assert is_outage(caught.value), f"{type(caught.value).__mro__} is not an outage"
    finally:
        if not connection.is_closed:
            await connection.close()
