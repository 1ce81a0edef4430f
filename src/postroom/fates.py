"""Fates: what became of the messages a replay run sent back.

After ``replay``, the question is whether it worked. Each replayed dead letter's message
is, for its consumer, in one of three states, read from the tables postroom keeps:

- **handled**: the consumer's inbox holds the message (its handler committed);
- **failed again**: a newer dead letter of the same consumer and message exists (and
  the inbox does not hold it): the replay failed; its id says where to look;
- **pending**: neither yet: still in the outbox (perhaps waiting out a retry's backoff),
  in the queue, or being handled.

The inbox is the proof of handling, so this is only as long-lived as the inbox rows
(``inbox_retention_days``): past that, a handled message reads as pending.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Text, cast, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from postroom.audit import Action
from postroom.errors import InvalidFilterError
from postroom.failures import DEFAULT_EXCHANGE
from postroom.filters import shown_time
from postroom.tables import audit, dead_letters, inbox, outbox, schema_map


class Fate(enum.StrEnum):
    """Where a replayed message stands now."""

    HANDLED = "handled"
    """Its consumer's handler committed it (the inbox holds it)."""
    FAILED_AGAIN = "failed_again"
    """It became a dead letter again; ``new_id`` is that dead letter."""
    PENDING = "pending"
    """Not handled yet: in the outbox, the queue, a retry's backoff, or being handled."""


@dataclass(frozen=True, slots=True)
class MessageFate:
    """One replayed dead letter and what became of its message."""

    id: int
    consumer: str
    message_id: str
    fate: Fate
    detail: str = ""
    new_id: int | None = None


@dataclass(frozen=True, slots=True)
class RunFates:
    """The fates of everything one replay run sent back."""

    run: str
    action: str
    actor: str
    at: datetime
    fates: tuple[MessageFate, ...]

    def counts(self) -> dict[str, int]:
        counted = Counter(f.fate for f in self.fates)
        return {fate.value: counted[fate] for fate in Fate if counted[fate]}

    @property
    def settled(self) -> bool:
        """True once no message is pending."""
        return all(f.fate is not Fate.PENDING for f in self.fates)

    def as_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "action": self.action,
            "actor": self.actor,
            "at": self.at.isoformat(),
            "counts": self.counts(),
            "messages": [
                {
                    "id": f.id,
                    "consumer": f.consumer,
                    "message_id": f.message_id,
                    "fate": f.fate.value,
                    "detail": f.detail,
                    "new_id": f.new_id,
                }
                for f in self.fates
            ],
        }


async def fates(engine: AsyncEngine, schema: str, run: str) -> RunFates:
    """Return the fate of each message replay run *run* (an id or its first 4+ characters) sent.

    Raises InvalidFilterError if *run* names no replay run, or more than one.
    """
    translate = {"schema_translate_map": schema_map(schema)}
    prefix = run.strip().lower().replace("%", "").replace("_", "")
    if len(prefix) < 4:
        raise InvalidFilterError(f"--run {run!r}: give at least 4 characters of a run id")
    replays = (Action.REPLAY.value, Action.EDIT_REPLAY.value)
    async with engine.connect() as connection:
        found = (
            await connection.execute(
                select(audit).where(audit.c.run.like(prefix + "%"), audit.c.action.in_(replays)),
                execution_options=translate,
            )
        ).all()
        if len(found) != 1:
            what = "no replay run" if not found else f"{len(found)} replay runs"
            raise InvalidFilterError(f"{what} start with {run!r} (see `postroom audit`)")
        entry = found[0]
        c = dead_letters.c
        replayed = (
            await connection.execute(
                select(c.id, c.consumer, c.message_id)
                .where(c.id.in_(entry.target_ids))
                .order_by(c.id),
                execution_options=translate,
            )
        ).all()
        pairs = list({(r.consumer, r.message_id) for r in replayed})
        handled: set[tuple[str, str]] = set()
        chains: dict[tuple[str, str], list[Any]] = {}
        queued: dict[tuple[str, str], Any] = {}
        if pairs:
            message_id = cast(inbox.c.message_id, Text)
            done = await connection.execute(
                select(inbox.c.consumer, message_id.label("m")).where(
                    tuple_(inbox.c.consumer, message_id).in_(pairs)
                ),
                execution_options=translate,
            )
            handled = {(r.consumer, r.m) for r in done}
            hops = await connection.execute(
                select(c.id, c.consumer, c.message_id, c.status, c.error_type, c.error_message)
                .where(tuple_(c.consumer, c.message_id).in_(pairs))
                .order_by(c.id),
                execution_options=translate,
            )
            for hop in hops:
                chains.setdefault((hop.consumer, hop.message_id), []).append(hop)
            outbox_id = cast(outbox.c.message_id, Text)
            waiting = await connection.execute(
                select(
                    outbox.c.routing_key,
                    outbox_id.label("m"),
                    outbox.c.headers,
                    outbox.c.available_at,
                ).where(
                    outbox.c.exchange == DEFAULT_EXCHANGE,
                    tuple_(outbox.c.routing_key, outbox_id).in_(pairs),
                ),
                execution_options=translate,
            )
            queued = {(r.routing_key, r.m): r for r in waiting}
    result = []
    for row in replayed:
        key = (row.consumer, row.message_id)
        later = [hop for hop in chains.get(key, []) if hop.id > row.id]
        if key in handled:
            result.append(MessageFate(row.id, row.consumer, row.message_id, Fate.HANDLED))
        elif later:
            hop = later[-1]
            detail = f"dead letter {hop.id} ({hop.status}): {hop.error_type}: {hop.error_message}"[
                :300
            ]
            result.append(
                MessageFate(row.id, row.consumer, row.message_id, Fate.FAILED_AGAIN, detail, hop.id)
            )
        elif key in queued:
            attempt = queued[key].headers.get("postroom-attempt", 1)
            due = shown_time(queued[key].available_at)
            detail = f"in the outbox, attempt {attempt}, due {due}"
            result.append(MessageFate(row.id, row.consumer, row.message_id, Fate.PENDING, detail))
        else:
            detail = "published: in the queue or being handled"
            result.append(MessageFate(row.id, row.consumer, row.message_id, Fate.PENDING, detail))
    return RunFates(entry.run, entry.action, entry.actor, entry.at, tuple(result))
