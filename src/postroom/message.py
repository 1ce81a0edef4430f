"""The message: the envelope stored in the outbox and sent over AMQP.

Mapping rules (DESIGN.md decision 6): the AMQP properties carry message_id, type
(the topic), timestamp, content_type and correlation_id; headers carry the
CloudEvents AMQP binding (``cloudEvents_*``), W3C ``traceparent`` and our own
``postroom-*`` keys. Our keys never start with ``x-``: RabbitMQ 4 owns those.
Nothing here imports a broker client, so web processes can publish cheaply.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from postroom.errors import DecodeError

JSON = "application/json"
SOURCE = "postroom"
SPECVERSION = "1.0"

H_ATTEMPT = "postroom-attempt"
H_KEY = "postroom-key"
H_CAUSATION = "postroom-causation-id"
H_FIRST_FAILED = "postroom-first-failed-at"
H_REPLAYS = "postroom-replays"
H_CONSUMER = "postroom-consumer"
H_LAST_ERROR = "postroom-last-error"
H_TRACEPARENT = "traceparent"
CE_ID = "cloudEvents_id"
CE_TYPE = "cloudEvents_type"
CE_SOURCE = "cloudEvents_source"
CE_TIME = "cloudEvents_time"
CE_SPECVERSION = "cloudEvents_specversion"
_CE_PREFIXES = ("cloudEvents_", "cloudEvents:", "ce-", "ce_")

HeaderValue = str | int | float | bool | None


def uuid7() -> uuid.UUID:
    """Return a UUIDv7 (RFC 9562): time-ordered, so outbox and inbox indexes stay local."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


@dataclass(frozen=True, slots=True)
class Message:
    """One event in transit: identity, routing facts, tracing ids and the encoded body."""

    message_id: uuid.UUID
    topic: str
    body: bytes
    occurred_at: datetime
    key: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    traceparent: str | None = None
    attempt: int = 1
    content_type: str = JSON
    source: str = SOURCE
    extra_headers: Mapping[str, HeaderValue] = field(default_factory=dict)

    def amqp_headers(self) -> dict[str, HeaderValue]:
        """Return the AMQP header table: the caller's headers, then ours (ours win)."""
        headers: dict[str, HeaderValue] = dict(self.extra_headers)
        headers.update(
            {
                CE_ID: str(self.message_id),
                CE_TYPE: self.topic,
                CE_SOURCE: self.source,
                CE_TIME: self.occurred_at.isoformat(),
                CE_SPECVERSION: SPECVERSION,
                H_ATTEMPT: self.attempt,
            }
        )
        if self.key is not None:
            headers[H_KEY] = self.key
        if self.causation_id is not None:
            headers[H_CAUSATION] = self.causation_id
        if self.traceparent is not None:
            headers[H_TRACEPARENT] = self.traceparent
        return headers

    def next_attempt(self, **headers: HeaderValue) -> Message:
        """Return the copy sent for the next attempt: same id, attempt + 1."""
        extra = dict(self.extra_headers)
        extra.update(headers)
        return replace(self, attempt=self.attempt + 1, extra_headers=extra)


def decode_amqp(
    *,
    body: bytes,
    message_id: str | None,
    type_: str | None,
    timestamp: datetime | None,
    content_type: str | None,
    correlation_id: str | None,
    headers: Mapping[str, Any] | None,
) -> Message:
    """Build a :class:`Message` from AMQP parts, strictly.

    Accepts messages from postroom and from other CloudEvents producers (``ce-``
    headers). Raises :class:`DecodeError` with a reason a person can act on when the
    id or topic is missing or malformed, or the content type is not JSON.
    """
    headers = dict(headers or {})
    ce = _cloudevents(headers)
    raw_id = message_id or _as_str(ce.get("id"))
    if not raw_id:
        raise DecodeError("message has no message_id property and no CloudEvents id")
    try:
        parsed_id = uuid.UUID(raw_id)
    except ValueError:
        raise DecodeError(f"message_id {raw_id[:80]!r} is not a UUID") from None
    topic = type_ or _as_str(ce.get("type"))
    if not topic:
        raise DecodeError("message has no type property and no CloudEvents type")
    ctype = (content_type or _as_str(ce.get("datacontenttype")) or "").split(";")[0].strip()
    if ctype != JSON:
        raise DecodeError(f"content type {ctype or 'none'!r} is not {JSON}")
    attempt = headers.get(H_ATTEMPT, 1)
    if isinstance(attempt, bytes):
        attempt = attempt.decode("ascii", "replace")
    try:
        attempt = int(attempt)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
        raise DecodeError(f"header {H_ATTEMPT} is not an integer: {attempt!r}") from None
    if attempt < 1:
        raise DecodeError(f"header {H_ATTEMPT} must be >= 1, got {attempt}")
    # The CloudEvents time first: the AMQP timestamp property holds whole seconds only,
    # too coarse for the end-to-end latency metric.
    occurred = _parse_time(ce.get("time")) or timestamp or datetime.now(UTC)
    if occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=UTC)
    known = {H_ATTEMPT, H_KEY, H_CAUSATION, H_TRACEPARENT}
    extra = {
        k: _header_value(v)
        for k, v in headers.items()
        if k not in known and not k.startswith(_CE_PREFIXES)
    }
    return Message(
        message_id=parsed_id,
        topic=topic,
        body=body,
        occurred_at=occurred,
        key=_as_str(headers.get(H_KEY)),
        correlation_id=correlation_id,
        causation_id=_as_str(headers.get(H_CAUSATION)),
        traceparent=_as_str(headers.get(H_TRACEPARENT)),
        attempt=attempt,
        content_type=ctype,
        source=_as_str(ce.get("source")) or SOURCE,
        extra_headers=extra,
    )


def _cloudevents(headers: Mapping[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in headers.items():
        for prefix in _CE_PREFIXES:
            if key.startswith(prefix):
                found.setdefault(key[len(prefix) :].lower(), value)
    return found


def _as_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _header_value(value: Any) -> HeaderValue:
    if isinstance(value, str | float):
        return _storable(value)
    if value is None or isinstance(value, int | bool):
        return value
    if isinstance(value, bytes):
        return _storable(value.decode("utf-8", "replace"))
    return _storable(str(value))


def _storable(value: str | float) -> str | float:
    """Return *value* as PostgreSQL can store it in text or jsonb: no NUL character
    (neither type can hold one), no NaN or infinity (jsonb refuses them)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    return value if math.isfinite(value) else str(value)


def _parse_time(value: Any) -> datetime | None:
    text = _as_str(value)
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as received, before any decoding: what the worker hands to dispatch.

    Broker-free on purpose, so the dispatch pipeline (and the testing helpers) run the
    very same code without RabbitMQ.
    """

    body: bytes
    message_id: str | None = None
    type: str | None = None
    timestamp: datetime | None = None
    content_type: str | None = None
    correlation_id: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    redelivered: bool = False

    @classmethod
    def of(cls, message: Message) -> Delivery:
        """Return the delivery the broker would make of *message*."""
        return cls(
            body=message.body,
            message_id=str(message.message_id),
            type=message.topic,
            timestamp=message.occurred_at,
            content_type=message.content_type,
            correlation_id=message.correlation_id,
            headers=message.amqp_headers(),
        )

    def decode(self) -> Message:
        """Decode the envelope strictly; raises :class:`DecodeError`."""
        return decode_amqp(
            body=self.body,
            message_id=self.message_id,
            type_=self.type,
            timestamp=self.timestamp,
            content_type=self.content_type,
            correlation_id=self.correlation_id,
            headers=self.headers,
        )


def json_safe(value: Any) -> Any:
    """Convert AMQP header values (bytes, datetimes, nested tables) to JSON-storable ones.

    Storable in PostgreSQL's jsonb too: NUL characters and non-finite floats, which a
    foreign producer may well send, are replaced (see :func:`_storable`).
    """
    if isinstance(value, str | float):
        return _storable(value)
    if value is None or isinstance(value, int | bool):
        return value
    if isinstance(value, bytes):
        return _storable(value.decode("utf-8", "replace"))
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {_storable(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return str(value)
