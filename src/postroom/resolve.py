"""Resolve dead letters: replay them to the consumer that failed, or purge them.

Work goes in small batches, each one transaction: the batch's dead letters are locked
and marked (``replayed`` or ``purged``); each replay also gets an outbox row addressed to
the failing consumer's queue only (default exchange, routing key = consumer name, as a
retry is), never to the topic's other subscribers; and one audit row names the batch.
A killed run loses nothing and applies nothing twice: a batch commits whole or not at
all, and what committed is no longer ``dead``, so the same command run again carries on
where the last one stopped. A replayed message keeps its message id, so a copy that
reaches the consumer twice is absorbed by its inbox.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from postroom import audit, triage
from postroom.audit import Action
from postroom.deadletters import DeadStatus
from postroom.errors import DecodeError, InvalidFilterError, PostroomError
from postroom.failures import DEFAULT_EXCHANGE
from postroom.message import H_CONSUMER, H_FIRST_FAILED, H_LAST_ERROR, H_REPLAYS, Delivery, Message
from postroom.outbox import Outbox
from postroom.tables import dead_letters, schema_map
from postroom.triage import Filters

Progress = Callable[[int, int], None]
"""Called with (dead letters handled so far, dead letters selected) after each batch."""

DEFAULT_MAX_REPLAYS = 3
_RESET_HEADERS = {H_FIRST_FAILED, H_LAST_ERROR, H_REPLAYS, H_CONSUMER}


class Verdict(enum.StrEnum):
    """What became of one selected dead letter (in a dry run: what would)."""

    REPLAYED = "replayed"
    """Sent back to its consumer's queue."""
    PURGED = "purged"
    """Marked purged; kept until the retention period ends."""
    REFUSED = "refused"
    """Cannot be rebuilt into a message (undecodable envelope, body over the size limit)."""
    LOOP_GUARD = "loop_guard"
    """Already replayed the allowed number of times and failed again; needs ``force``."""
    SKIPPED = "skipped"
    """Named by id but not acted on: no longer dead, or outside the filters or the limit."""


@dataclass(frozen=True, slots=True)
class Item:
    """One dead letter's verdict and why."""

    id: int
    consumer: str
    message_id: str
    verdict: Verdict
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    """The result of a replay or purge; ``run`` is in the details of its audit rows."""

    action: Action
    dry_run: bool
    run: str
    items: tuple[Item, ...]

    def ids(self, verdict: Verdict) -> list[int]:
        return [item.id for item in self.items if item.verdict is verdict]

    @property
    def complete(self) -> bool:
        """True if something was selected and every selected dead letter was acted on."""
        return bool(self.items) and all(
            item.verdict in (Verdict.REPLAYED, Verdict.PURGED) for item in self.items
        )

    def as_json(self) -> dict[str, Any]:
        counts = {v.value: len(self.ids(v)) for v in Verdict if self.ids(v)}
        return {
            "action": self.action.value,
            "dry_run": self.dry_run,
            "run": self.run,
            "counts": counts,
            "items": [
                {
                    "id": i.id,
                    "consumer": i.consumer,
                    "message_id": i.message_id,
                    "verdict": i.verdict.value,
                    "detail": i.detail,
                }
                for i in self.items
            ],
        }


async def replay(
    engine: AsyncEngine,
    schema: str,
    filters: Filters,
    *,
    outbox: Outbox,
    actor: str,
    dry_run: bool = False,
    limit: int | None = None,
    rate: float | None = None,
    max_replays: int = DEFAULT_MAX_REPLAYS,
    force: bool = False,
    batch_size: int = 100,
    progress: Progress | None = None,
) -> Report:
    """Send the dead letters matching *filters* back to their consumers, oldest first.

    Each message goes to the queue of the consumer that failed it, with attempt 1, the
    same message id and ``postroom-replays`` counting replays. One that was replayed
    *max_replays* times already is flagged, not replayed, unless *force*. *rate* bounds
    messages per second (a transaction then holds at most a second's worth); *limit*
    bounds how many are selected. A dry run reports the verdicts and changes nothing.
    Raises UnknownDeadLetterError or InvalidFilterError before changing anything.
    """
    run = str(uuid.uuid4())
    size = batch_size if rate is None else max(1, min(batch_size, int(rate)))
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    translate = {"schema_translate_map": schema_map(schema)}
    ids, items = await _select(engine, schema, filters, limit)
    pace = _Pace(rate)
    done = 0
    for chunk in _chunks(ids, size):
        await pace.wait(done)
        async with sessions() as session:  # closing without commit rolls back
            rows = await _lock_dead(session, chunk, translate, lock=not dry_run)
            verdicts = [_verdict(row, outbox, max_replays, force) for row in rows]
            sent = [(row, msg) for row, (_, msg) in zip(rows, verdicts, strict=True) if msg]
            if sent and not dry_run:
                for row, message in sent:
                    await outbox.write(
                        session, message, exchange=DEFAULT_EXCHANGE, routing_key=row.consumer
                    )
                sent_ids = [row.id for row, _ in sent]
                await _mark(session, sent_ids, DeadStatus.REPLAYED, translate)
                await audit.write(
                    session,
                    schema=schema,
                    actor=actor,
                    action=Action.REPLAY,
                    target_ids=sent_ids,
                    count=len(sent_ids),
                    details={"run": run, "filters": filters.as_json(), "force": force},
                )
                await session.commit()
        items.extend(item for item, _ in verdicts)
        items.extend(_vanished(chunk, rows))
        done += len(chunk)
        if progress:
            progress(done, len(ids))
    return Report(Action.REPLAY, dry_run, run, tuple(sorted(items, key=lambda i: i.id)))


async def purge(
    engine: AsyncEngine,
    schema: str,
    filters: Filters,
    *,
    actor: str,
    confirm: bool = False,
    dry_run: bool = False,
    limit: int | None = None,
    batch_size: int = 500,
    progress: Progress | None = None,
) -> Report:
    """Mark the dead letters matching *filters* purged; prune deletes them after retention.

    Needs *confirm* (or *dry_run*, which reports and changes nothing). Raises like
    :func:`replay` before changing anything.
    """
    if not (confirm or dry_run):
        raise PostroomError("purge needs confirm=True (or dry_run=True)")
    run = str(uuid.uuid4())
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    translate = {"schema_translate_map": schema_map(schema)}
    ids, items = await _select(engine, schema, filters, limit)
    done = 0
    for chunk in _chunks(ids, batch_size):
        async with sessions() as session:  # closing without commit rolls back
            rows = await _lock_dead(session, chunk, translate, lock=not dry_run)
            marked = [row.id for row in rows]
            if marked and not dry_run:
                await _mark(session, marked, DeadStatus.PURGED, translate)
                await audit.write(
                    session,
                    schema=schema,
                    actor=actor,
                    action=Action.PURGE,
                    target_ids=marked,
                    count=len(marked),
                    details={"run": run, "filters": filters.as_json()},
                )
                await session.commit()
        items.extend(Item(r.id, r.consumer, r.message_id, Verdict.PURGED) for r in rows)
        items.extend(_vanished(chunk, rows))
        done += len(chunk)
        if progress:
            progress(done, len(ids))
    return Report(Action.PURGE, dry_run, run, tuple(sorted(items, key=lambda i: i.id)))


def rebuild(row: Any) -> Message:
    """Rebuild the message to replay from a dead-letter row; raise DecodeError if it can't be.

    Attempt 1, same message id, ``postroom-replays`` = replays so far + 1, and the failure
    headers of the last run (and any broker ``x-`` header) left behind.
    """
    decoded = Delivery(
        body=bytes(row.body),
        message_id=row.message_id,
        type=row.topic,
        content_type=row.content_type,
        correlation_id=row.correlation_id,
        headers=row.headers,
    ).decode()
    extra = {
        name: value
        for name, value in decoded.extra_headers.items()
        if name not in _RESET_HEADERS and not name.lower().startswith("x-")
    }
    extra[H_REPLAYS] = row.replays + 1
    extra[H_CONSUMER] = row.consumer
    return replace(decoded, attempt=1, extra_headers=extra)


def _verdict(
    row: Any, outbox: Outbox, max_replays: int, force: bool
) -> tuple[Item, Message | None]:
    def item(verdict: Verdict, detail: str = "") -> Item:
        return Item(row.id, row.consumer, row.message_id, verdict, detail)

    try:
        message = rebuild(row)
    except DecodeError as exc:
        return item(Verdict.REFUSED, f"cannot be rebuilt into a message: {exc}"), None
    if len(message.body) > outbox.max_body_bytes:
        detail = f"body is {len(message.body)} bytes; the limit is {outbox.max_body_bytes}"
        return item(Verdict.REFUSED, detail), None
    if row.replays >= max_replays and not force:
        detail = f"replayed {row.replays} times already and failed again; fix it, then force"
        return item(Verdict.LOOP_GUARD, detail), None
    return item(Verdict.REPLAYED), message


async def _select(
    engine: AsyncEngine, schema: str, filters: Filters, limit: int | None
) -> tuple[list[int], list[Item]]:
    """Return the ids to act on (oldest first) and the named ids that will not be."""
    if filters.status not in (None, DeadStatus.DEAD):
        raise InvalidFilterError("only dead letters (status dead) can be replayed or purged")
    live = replace(filters, status=DeadStatus.DEAD)
    c = dead_letters.c
    query = select(c.id).where(*live.clauses()).order_by(c.id)
    if limit is not None:
        query = query.limit(limit)
    translate = {"schema_translate_map": schema_map(schema)}
    async with engine.connect() as connection:
        await triage.check_ids(connection, schema, filters.ids)
        ids = list((await connection.execute(query, execution_options=translate)).scalars())
        chosen = set(ids)
        left = [i for i in filters.ids if i not in chosen]
        others = select(c.id, c.consumer, c.message_id, c.status).where(c.id.in_(left))
        rows = (await connection.execute(others, execution_options=translate)).all()
    skipped = [
        Item(
            row.id,
            row.consumer,
            row.message_id,
            Verdict.SKIPPED,
            f"already {row.status}"
            if row.status != DeadStatus.DEAD
            else "outside the filters or the limit",
        )
        for row in rows
    ]
    return ids, skipped


async def _lock_dead(
    session: AsyncSession, ids: Sequence[int], translate: dict[str, Any], *, lock: bool
) -> list[Row[Any]]:
    """Return (and lock, unless a dry run) the rows of *ids* that are still dead."""
    query = (
        select(dead_letters)
        .where(dead_letters.c.id.in_(ids), dead_letters.c.status == DeadStatus.DEAD.value)
        .order_by(dead_letters.c.id)
    )
    if lock:
        query = query.with_for_update()
    return list((await session.execute(query, execution_options=translate)).all())


async def _mark(
    session: AsyncSession, ids: Sequence[int], status: DeadStatus, translate: dict[str, Any]
) -> None:
    values: dict[str, Any] = {"status": status.value, "updated_at": func.now()}
    if status is DeadStatus.REPLAYED:
        values["replays"] = dead_letters.c.replays + 1
    statement = update(dead_letters).where(dead_letters.c.id.in_(ids)).values(values)
    await session.execute(statement, execution_options=translate)


def _vanished(chunk: Sequence[int], rows: Sequence[Row[Any]]) -> Iterable[Item]:
    """Selected ids that were resolved by someone else before their batch ran."""
    found = {row.id for row in rows}
    for letter_id in chunk:
        if letter_id not in found:
            yield Item(letter_id, "", "", Verdict.SKIPPED, "resolved by another run meanwhile")


def _chunks(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    iterator = iter(ids)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class _Pace:
    """Keep a long run at or under *rate* dead letters per second (None: no bound)."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._start: float | None = None

    async def wait(self, done: int) -> None:
        if not self._rate:
            return
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        delay = self._start + done / self._rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
