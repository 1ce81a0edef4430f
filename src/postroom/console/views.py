"""The console's read-only pages: groups, dead letters, one dead letter, consumers, outbox, audit.

Each page calls the function the matching CLI command calls (:mod:`postroom.lookup`,
:mod:`postroom.fates`, :mod:`postroom.lag`, :mod:`postroom.audit`, :mod:`postroom.pauses`)
and renders what it returns; a bad filter or an unknown name is shown on the page (status
400) in the CLI's words. Bodies and headers are shown redacted as the router's consumers
declare (``postroom console --router``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from postroom import audit, fates, lag, lookup, pauses
from postroom.console.state import console_of
from postroom.deadletters import DeadReason, DeadStatus
from postroom.errors import InvalidFilterError, UnknownDeadLetterError
from postroom.filters import Filters

FILTERS = ("consumer", "topic", "error_type", "text", "reason", "since", "until")
PAGE = 50


def filters_of(params: Mapping[str, str], *, status: str | None = "dead") -> Filters:
    """Parse the filter fields of a query or form, as the CLI's options are parsed."""

    def given(name: str) -> str | None:
        return (params.get(name) or "").strip() or None

    try:
        ids = [int(part) for part in (params.get("ids") or "").replace(",", " ").split()]
    except ValueError:
        raise InvalidFilterError("ids are dead-letter ids: numbers, separated by spaces") from None

    return Filters.parse(
        consumer=given("consumer"),
        topic=given("topic"),
        error_type=given("error_type"),
        text=given("text"),
        reason=given("reason"),
        since=given("since"),
        until=given("until"),
        status=given("status") or status,
        ids=ids,
    )


def query_of(params: Mapping[str, str], *, drop: tuple[str, ...] = ()) -> str:
    """The filter fields of *params* as a query string, for links that keep them."""
    from urllib.parse import urlencode

    kept = {
        k: v for k, v in params.items() if k in (*FILTERS, "status", "ids") and v and k not in drop
    }
    return urlencode(kept)


async def _choices(request: Request) -> dict[str, Any]:
    """What the filter form offers: the consumers known here, the reasons, the statuses."""
    console = console_of(request)
    known = await pauses.known(console.db, console.schema) | console.consumers
    return {
        "consumers": sorted(known),
        "reasons": [r.value for r in DeadReason],
        "statuses": [*(s.value for s in DeadStatus), "all"],
        "params": dict(request.query_params),
        "query": query_of(request.query_params),
    }


async def groups(request: Request) -> Response:
    """Groups of failures at a glance: counts by consumer, error type and message shape."""
    console = console_of(request)
    choices = await _choices(request)
    try:
        filters = filters_of(request.query_params)
    except InvalidFilterError as exc:
        return console.render(request, "groups.html", status=400, error=str(exc), **choices)
    try:
        found = await lookup.group_letters(
            console.db, console.schema, filters, router=console.router
        )
    except (InvalidFilterError, UnknownDeadLetterError) as exc:
        return console.render(request, "groups.html", status=400, error=str(exc), **choices)
    paused = await pauses.paused(console.db, console.schema)
    outbox = await lag.outbox_status(console.db, console.schema, failures=0)
    return console.render(
        request, "groups.html", groups=found, paused=paused, outbox=outbox, **choices
    )


async def letters(request: Request) -> Response:
    """Dead letters, newest first, filtered; a page at a time."""
    console = console_of(request)
    choices = await _choices(request)
    try:
        filters = filters_of(request.query_params)
        before = int(request.query_params["before"]) if "before" in request.query_params else None
    except (InvalidFilterError, ValueError) as exc:
        return console.render(request, "letters.html", status=400, error=str(exc), **choices)
    try:
        page = await lookup.list_letters(
            console.db, console.schema, filters, limit=PAGE, before=before, router=console.router
        )
    except (InvalidFilterError, UnknownDeadLetterError) as exc:
        return console.render(request, "letters.html", status=400, error=str(exc), **choices)
    return console.render(request, "letters.html", page=page, narrowed=filters.narrows, **choices)


async def letter(request: Request) -> Response:
    """One dead letter whole: body, headers, traceback; its chain, fate and audit rows."""
    console = console_of(request)
    letter_id = int(request.path_params["id"])
    try:
        detail = await lookup.get_letter(
            console.db, console.schema, letter_id, router=console.router
        )
    except UnknownDeadLetterError as exc:
        return console.render(request, "refused.html", status=404, why=str(exc))
    history = await audit.entries(console.db, console.schema, target=letter_id, limit=100)
    history.reverse()  # oldest first, as the chain
    fate = None
    replays = [e for e in history if e.action == audit.Action.REPLAY and letter_id in e.target_ids]
    if replays and replays[-1].run:
        run = await fates.fates(console.db, console.schema, replays[-1].run)
        fate = next((f for f in run.fates if f.id == letter_id), None)
    return console.render(
        request,
        "letter.html",
        letter=detail.letter,
        detail=detail,
        body=_body(detail.body),
        headers=json.dumps(dict(detail.headers), indent=2, default=str, sort_keys=True),
        chain=detail.chain,
        fate=fate,
        history=history,
    )


def _body(body: bytes) -> dict[str, str]:
    """The body for people: pretty JSON, else text, else base64."""
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError:
        return {"encoding": "base64", "text": base64.b64encode(body).decode("ascii")}
    try:
        return {"encoding": "json", "text": json.dumps(json.loads(decoded), indent=2)}
    except json.JSONDecodeError:
        return {"encoding": "utf-8", "text": decoded}


async def consumers(request: Request) -> Response:
    """Every consumer known here, paused or running, with the pause and resume buttons."""
    console = console_of(request)
    paused = await pauses.paused(console.db, console.schema)
    known = await pauses.known(console.db, console.schema) | console.consumers
    return console.render(request, "consumers.html", names=sorted(known), paused=paused, error=None)


async def outbox(request: Request) -> Response:
    """The outbox now: due, scheduled and errored rows per topic, and the oldest one's wait."""
    console = console_of(request)
    state = await lag.outbox_status(console.db, console.schema)
    return console.render(request, "outbox.html", state=state)


async def audit_trail(request: Request) -> Response:
    """The audit trail, newest first; ``run`` shows one command run and its messages' fates."""
    console = console_of(request)
    params = request.query_params
    run = params.get("run") or None
    try:
        target = int(params["id"]) if params.get("id") else None
        entries = await audit.entries(
            console.db,
            console.schema,
            action=params.get("action") or None,
            actor=params.get("actor") or None,
            target=target,
            run=run,
            limit=100,
        )
    except (InvalidFilterError, UnknownDeadLetterError, ValueError) as exc:
        why = "id is a dead-letter id: a number" if isinstance(exc, ValueError) else str(exc)
        return console.render(request, "refused.html", status=400, why=why)
    outcome = None
    if run and any(e.action in (audit.Action.REPLAY, audit.Action.EDIT_REPLAY) for e in entries):
        outcome = await fates.fates(console.db, console.schema, run)
    return console.render(
        request,
        "audit.html",
        entries=entries,
        run=run,
        outcome=outcome,
        actions=[a.value for a in audit.Action],
        params=dict(params),
    )


ROUTES = [
    Route("/", groups, name="groups"),
    Route("/letters", letters, name="letters"),
    Route("/letters/{id:int}", letter, name="letter"),
    Route("/consumers", consumers, name="consumers"),
    Route("/outbox", outbox, name="outbox"),
    Route("/audit", audit_trail, name="audit"),
]
