"""Replay dead letters: send them back to the consumer that failed them, and to no other.

Each replayed message gets an outbox row addressed to the failing consumer's queue only
(default exchange, routing key = consumer name, as a retry is), never to the topic's other
subscribers, in the same transaction that marks its dead letter ``replayed`` and adds to
the run's audit row (see :mod:`postroom.runs` for batches, confirmation and reruns). A
replayed message keeps its message id, so a copy that reaches the consumer twice is
absorbed by its inbox, and a replay that fails again is a new dead letter of the same
chain (:func:`postroom.lookup.get_letter`).

:func:`replay_edited` replays one dead letter with a corrected body: the body is checked
against the consumer's event model when a router is given, the edited copy is sent, and
the dead letter keeps the original (both are in the audit row).
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import select

from postroom.audit import Action
from postroom.deadletters import DeadStatus
from postroom.errors import DecodeError, InvalidEditError, UnknownDeadLetterError
from postroom.failures import DEFAULT_EXCHANGE
from postroom.filters import Filters
from postroom.message import H_CONSUMER, H_FIRST_FAILED, H_LAST_ERROR, H_REPLAYS, Delivery, Message
from postroom.outbox import Outbox
from postroom.redaction import H_REDACTED
from postroom.runs import (
    DEFAULT_THRESHOLD,
    Item,
    Plan,
    Progress,
    Report,
    Verdict,
    ask_first,
    execute,
    item_of,
    mark,
    needs_confirmation,
    select_ids,
)
from postroom.tables import dead_letters, schema_map

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

    from postroom.router import Router

DEFAULT_MAX_REPLAYS = 3
_RESET_HEADERS = {H_FIRST_FAILED, H_LAST_ERROR, H_REPLAYS, H_CONSUMER, H_REDACTED}


async def replay(
    engine: AsyncEngine,
    schema: str,
    filters: Filters,
    *,
    outbox: Outbox,
    actor: str,
    dry_run: bool = False,
    confirm: bool = False,
    threshold: int = DEFAULT_THRESHOLD,
    limit: int | None = None,
    rate: float | None = None,
    max_replays: int = DEFAULT_MAX_REPLAYS,
    force: bool = False,
    batch_size: int = 100,
    progress: Progress | None = None,
    router: Router | None = None,
) -> Report:
    """Send the dead letters matching *filters* back to their consumers, oldest first.

    Each message goes to the queue of the consumer that failed it, with attempt 1, the
    same message id and ``postroom-replays`` counting replays. One that was replayed
    *max_replays* times already is flagged, not replayed, unless *force*. *rate* bounds
    messages per second (a transaction then holds at most a second's worth); *limit*
    bounds how many are selected. A dry run reports the verdicts and changes nothing.
    More than *threshold* dead letters, or every one (no filter), need *confirm*: else
    ConfirmationNeededError with the preview. Raises UnknownDeadLetterError or
    InvalidFilterError (unknown names too) before changing anything.
    """

    async def judge(session: AsyncSession, rows: list[Any]) -> list[tuple[Item, Any]]:
        return [_verdict(row, outbox, max_replays, force) for row in rows]

    async def apply(session: AsyncSession, acted: list[tuple[Any, Any]]) -> None:
        for row, message in acted:
            await outbox.write(
                session, message, exchange=DEFAULT_EXCHANGE, routing_key=row.consumer
            )
        await mark(session, [row.id for row, _ in acted], DeadStatus.REPLAYED, schema)

    parameters = {
        "filters": filters.as_json(),
        "limit": limit,
        "rate": rate,
        "max_replays": max_replays,
        "force": force,
        "batch_size": batch_size,
        "threshold": threshold,
        "confirmed": confirm,
    }
    plan = Plan(Action.REPLAY, DeadStatus.DEAD, judge, apply, parameters)
    if not (dry_run or confirm):
        ids, _ = await select_ids(engine, schema, filters, DeadStatus.DEAD, limit, router=router)
        why = needs_confirmation(filters, len(ids), threshold)
        if why:
            await ask_first(
                engine, schema, filters, plan, why=why, actor=actor, limit=limit, router=router
            )
    return await execute(
        engine,
        schema,
        filters,
        plan,
        run=str(uuid.uuid4()),
        actor=actor,
        dry_run=dry_run,
        limit=limit,
        batch_size=batch_size,
        rate=rate,
        progress=progress,
        router=router,
    )


async def replay_edited(
    engine: AsyncEngine,
    schema: str,
    letter_id: int,
    body: bytes,
    *,
    outbox: Outbox,
    actor: str,
    router: Router | None = None,
    dry_run: bool = False,
) -> Report:
    """Replay dead letter *letter_id* with *body* instead of the body it holds.

    With *router*, *body* must validate against the consumer's event model (else
    InvalidEditError naming the first problems, nothing changed). The dead letter keeps
    its original body; the audit row holds both, base64. The loop guard does not apply: a
    person wrote this body. Only a ``dead`` dead letter can be edited and replayed.
    """

    async def judge(session: AsyncSession, rows: list[Any]) -> list[tuple[Item, Any]]:
        judged: list[tuple[Item, Any]] = []
        for row in rows:
            found = (
                None
                if router is None
                else next((x for x in router if x.name == row.consumer), None)
            )
            if router is not None and found is None:
                raise InvalidEditError(
                    f"consumer {row.consumer!r} is not in the router given; known: "
                    + ", ".join(sorted(x.name for x in router))
                )
            if found is not None:
                try:
                    found.event_type.model_validate_json(body)
                except ValidationError as exc:
                    problems = "; ".join(
                        f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                        for e in exc.errors()[:3]
                    )
                    raise InvalidEditError(
                        f"the edited body is not a valid {found.event_type.__name__}: {problems}"
                    ) from None
            try:
                message = replace(rebuild(row), body=body)
            except DecodeError as exc:
                judged.append(
                    (item_of(row, Verdict.REFUSED, f"envelope cannot be rebuilt: {exc}"), None)
                )
                continue
            if len(body) > outbox.max_body_bytes:
                detail = f"edited body is {len(body)} bytes; the limit is {outbox.max_body_bytes}"
                judged.append((item_of(row, Verdict.REFUSED, detail), None))
                continue
            judged.append((item_of(row, Verdict.REPLAYED, "edited body"), message))
        return judged

    async def apply(session: AsyncSession, acted: list[tuple[Any, Any]]) -> None:
        for row, message in acted:
            await outbox.write(
                session, message, exchange=DEFAULT_EXCHANGE, routing_key=row.consumer
            )
        await mark(session, [row.id for row, _ in acted], DeadStatus.REPLAYED, schema)

    original = await _original_body(engine, schema, letter_id)
    parameters = {
        "id": letter_id,
        "original_body": base64.b64encode(original).decode("ascii"),
        "edited_body": base64.b64encode(body).decode("ascii"),
    }
    plan = Plan(Action.EDIT_REPLAY, DeadStatus.DEAD, judge, apply, parameters)
    return await execute(
        engine,
        schema,
        Filters(ids=(letter_id,)),
        plan,
        run=str(uuid.uuid4()),
        actor=actor,
        dry_run=dry_run,
        limit=None,
        batch_size=1,
        router=None,
    )


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
    if "body" in str(row.headers.get(H_REDACTED) or ""):
        detail = "its body was redacted when stored; replay it with `dead-letters edit`"
        return item_of(row, Verdict.REFUSED, detail), None
    try:
        message = rebuild(row)
    except DecodeError as exc:
        return item_of(row, Verdict.REFUSED, f"cannot be rebuilt into a message: {exc}"), None
    if len(message.body) > outbox.max_body_bytes:
        detail = f"body is {len(message.body)} bytes; the limit is {outbox.max_body_bytes}"
        return item_of(row, Verdict.REFUSED, detail), None
    if row.replays >= max_replays and not force:
        detail = f"replayed {row.replays} times already and failed again; fix it, then force"
        return item_of(row, Verdict.LOOP_GUARD, detail), None
    return item_of(row, Verdict.REPLAYED), message


async def _original_body(engine: AsyncEngine, schema: str, letter_id: int) -> bytes:
    async with engine.connect() as connection:
        body = await connection.scalar(
            select(dead_letters.c.body).where(dead_letters.c.id == letter_id),
            execution_options={"schema_translate_map": schema_map(schema)},
        )
    if body is None:
        raise UnknownDeadLetterError([letter_id])
    return bytes(body)
