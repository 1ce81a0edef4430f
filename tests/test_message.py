"""The envelope: AMQP mapping, CloudEvents headers in and out, strict decoding."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from postroom.errors import DecodeError
from postroom.message import Delivery, Message, decode_amqp, uuid7


def make(**kw) -> Message:
    base = dict(
        message_id=uuid7(),
        topic="shop.order-placed",
        body=b'{"a":1}',
        occurred_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        key="k1",
        correlation_id="c1",
        causation_id="p1",
        traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        extra_headers={"tenant": "acme"},
    )
    base.update(kw)
    return Message(**base)


def test_uuid7_is_time_ordered_and_versioned():
    ids = [uuid7() for _ in range(50)]
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert len(set(ids)) == 50
    first, last = ids[0].int >> 80, ids[-1].int >> 80
    assert first <= last


def test_round_trip_through_amqp_parts():
    message = make(attempt=2)
    decoded = Delivery.of(message).decode()
    assert decoded == message


def test_accepts_cloudevents_headers_from_other_producers():
    decoded = decode_amqp(
        body=b"{}",
        message_id=None,
        type_=None,
        timestamp=None,
        content_type="application/json; charset=utf-8",
        correlation_id=None,
        headers={
            "ce-id": str(uuid.uuid4()),
            "ce-type": "other.thing",
            "ce-source": "svc",
            "ce-time": "2026-01-01T00:00:00Z",
        },
    )
    assert decoded.topic == "other.thing" and decoded.source == "svc"
    assert decoded.occurred_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert decoded.attempt == 1


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"message_id": None}, "no message_id"),
        ({"message_id": "42"}, "not a UUID"),
        ({"type_": None}, "no type"),
        ({"content_type": "application/xml"}, "not application/json"),
        ({"headers": {"postroom-attempt": "many"}}, "not an integer"),
        ({"headers": {"postroom-attempt": 0}}, ">= 1"),
    ],
)
def test_strict_decoding_explains_what_is_wrong(kw, reason):
    parts = dict(
        body=b"{}",
        message_id=str(uuid.uuid4()),
        type_="a.b",
        timestamp=None,
        content_type="application/json",
        correlation_id=None,
        headers={},
    )
    parts.update(kw)
    with pytest.raises(DecodeError, match=reason):
        decode_amqp(**parts)


def test_our_headers_never_start_with_x():
    headers = make().amqp_headers()
    assert not [k for k in headers if k.lower().startswith("x-")]
    assert headers["cloudEvents_specversion"] == "1.0"
    assert headers["postroom-causation-id"] == "p1"
