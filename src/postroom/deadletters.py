"""Dead letters: messages a consumer gave up on, kept with the reason, for people to act on.

Writing one is idempotent per (consumer, message id) while it is live (status ``dead``),
so a redelivered poison message does not pile up copies; after a replay a new failure
makes a new dead letter.
"""

from __future__ import annotations

import enum
import traceback as tb
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from postroom.message import json_safe
from postroom.redaction import Redaction, mask
from postroom.tables import dead_letters, schema_map

MAX_TRACEBACK_CHARS = 8000
MAX_MESSAGE_CHARS = 2000


class DeadReason(enum.StrEnum):
    """Why a message became a dead letter."""

    REJECTED = "rejected"
    """The handler raised ``Reject``: it will never succeed, don't retry."""
    EXHAUSTED = "exhausted"
    """The handler kept failing until the consumer's max attempts ran out."""
    UNDECODABLE = "undecodable"
    """The envelope or the payload could not be decoded or validated."""
    UNKNOWN_TOPIC = "unknown_topic"
    """The message's topic is not one its consumer handles."""
    TOO_LARGE = "too_large"
    """The body exceeds the configured size limit."""
    DELIVERY_LIMIT = "delivery_limit"
    """The broker gave up after repeated redeliveries (workers crashed on it)."""


class DeadStatus(enum.StrEnum):
    """Where a dead letter stands in its life."""

    DEAD = "dead"
    """Waiting for a person: replay it or purge it."""
    REPLAYED = "replayed"
    """Sent back to its consumer; kept for the retention period."""
    PURGED = "purged"
    """Given up on deliberately; kept for the retention period."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Everything needed to understand a failure and to replay the message."""

    consumer: str
    message_id: str
    topic: str | None
    reason: DeadReason
    error_type: str
    error_message: str
    traceback: str | None
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    headers: Mapping[str, Any]
    body: bytes
    content_type: str | None
    correlation_id: str | None


def describe(exc: BaseException) -> tuple[str, str, str]:
    """Return (error type, message, truncated traceback) of *exc*, for a dead letter."""
    kind = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        kind = f"{module}.{kind}"
    trace = "".join(tb.format_exception(exc))
    if len(trace) > MAX_TRACEBACK_CHARS:
        trace = "...\n" + trace[-MAX_TRACEBACK_CHARS:]
    return kind, str(exc)[:MAX_MESSAGE_CHARS], trace


def redact(letter: DeadLetter, redaction: Redaction | None) -> DeadLetter:
    """Return *letter* with its body and headers redacted as its consumer declared."""
    if redaction is None:
        return letter
    secrets = redaction.secrets(letter.body, letter.headers)
    body, headers = redaction.apply(letter.body, letter.headers)
    return replace(
        letter,
        body=body,
        headers=headers,
        error_message=mask(letter.error_message, secrets),
        traceback=None if letter.traceback is None else mask(letter.traceback, secrets),
    )


async def record(session: AsyncSession, letter: DeadLetter, *, schema: str) -> bool:
    """Insert *letter* in the caller's transaction; return False if it was already live."""
    statement = (
        insert(dead_letters)
        .values(
            # Text columns cannot hold NUL, which undecodable messages may carry anywhere.
            consumer=letter.consumer,
            message_id=_text(letter.message_id),
            topic=_text(letter.topic),
            reason=letter.reason.value,
            error_type=_text(letter.error_type),
            error_message=_text(letter.error_message),
            traceback=_text(letter.traceback),
            attempts=letter.attempts,
            first_failed_at=letter.first_failed_at,
            last_failed_at=letter.last_failed_at,
            headers=json_safe(dict(letter.headers)),
            body=letter.body,
            content_type=_text(letter.content_type),
            correlation_id=_text(letter.correlation_id),
            replays=_replays(letter.headers),
        )
        .on_conflict_do_nothing(
            index_elements=["consumer", "message_id"],
            index_where=text("status = 'dead'"),
        )
        .returning(dead_letters.c.id)
    )
    result = await session.execute(
        statement, execution_options={"schema_translate_map": schema_map(schema)}
    )
    return result.first() is not None


def _text(value: str | None) -> str | None:
    return None if value is None else value.replace("\x00", "\ufffd")


def _replays(headers: Mapping[str, Any]) -> int:
    try:
        return max(0, min(int(headers.get("postroom-replays") or 0), 2**31 - 1))
    except (TypeError, ValueError, OverflowError):
        return 0
