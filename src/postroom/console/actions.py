"""The console's changes: log in and out, replay and purge (preview, then confirm), pause, resume.

Every change is a POST that passes :meth:`Gate.check_change` first (an operator, with the
session's CSRF token). A replay or purge is two steps: the preview is the real function's
dry run (:func:`postroom.resolve.replay` / :func:`~postroom.resolve.purge` with
``dry_run=True``), broken down by consumer and error type; the confirmation acts on
exactly the dead letters the preview listed (their ids), never on what a filter matches
by then, so a dead letter that arrived in between is not swept along unseen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from postroom import pauses, resolve, triage
from postroom.console.auth import COOKIE, Identity, Refused, set_session
from postroom.console.state import console_of, identity_of
from postroom.console.views import filters_of, query_of
from postroom.deadletters import DeadStatus
from postroom.errors import InvalidFilterError, UnknownDeadLetterError
from postroom.outbox import Outbox

MAX_SELECTION = 5000
"""Dead letters one console replay or purge may act on; the CLI takes more, in batches."""


@dataclass(frozen=True, slots=True)
class Slice:
    """How many of the selected dead letters belong to one consumer and error type."""

    consumer: str
    error_type: str
    count: int


async def login_form(request: Request) -> Response:
    """Show the login form: a name (the actor in the audit) and a console token."""
    console = console_of(request)
    return console.render(request, "login.html", error=None)


async def login(request: Request) -> Response:
    """Start a session for a name and a valid token; the token decides the role."""
    console = console_of(request)
    form = await request.form()
    try:
        cookie = console.gate.login(_text(form, "name"), _text(form, "token"))
    except Refused as refused:
        return console.render(request, "login.html", status=401, error=refused.why)
    response = RedirectResponse("/", status_code=303)
    set_session(request, response, cookie)
    return response


async def logout(request: Request) -> Response:
    """End the session (a POST with its CSRF token, so no other site can log you out)."""
    await _change(request, operator=False)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


async def preview(request: Request) -> Response:
    """Show exactly what a replay or purge of the filtered dead letters would do."""
    console = console_of(request)
    action = _action(request)
    params = request.query_params
    try:
        filters = filters_of(params)
    except InvalidFilterError as exc:
        return console.render(request, "refused.html", status=400, why=str(exc))
    if filters.status is not DeadStatus.DEAD:
        why = "only dead letters (status dead) can be replayed or purged"
        return console.render(request, "refused.html", status=400, why=why)
    if not filters.narrows and params.get("all") != "1":
        why = "say which dead letters: a filter, or all of them (all=1)"
        return console.render(request, "refused.html", status=400, why=why)
    report = await _run(request, action, filters, identity_of(request), dry_run=True)
    chosen = report.ids(resolve.Verdict.REPLAYED if action == "replay" else resolve.Verdict.PURGED)
    slices = await _slices(request, chosen)
    everyone = await triage.group_letters(
        console.db, console.schema, triage.Filters(status=DeadStatus.DEAD), limit=10_000
    )
    untouched = sorted({g.consumer for g in everyone} - {s.consumer for s in slices})
    held = [item for item in report.items if item.id not in set(chosen)]
    return console.render(
        request,
        "preview.html",
        action=action,
        report=report,
        chosen=chosen,
        slices=slices,
        untouched=untouched,
        held=held[:50],
        held_count=len(held),
        criteria=filters.as_json(),
        query=query_of(params),
        capped=len(report.items) >= MAX_SELECTION,
        limit=MAX_SELECTION,
    )


async def confirm(request: Request) -> Response:
    """Replay or purge exactly the dead letters the preview listed."""
    console = console_of(request)
    identity, form = await _change(request)
    action = _action(request)
    try:
        ids = tuple(int(part) for part in _text(form, "ids").split())
    except ValueError:
        raise Refused(400, "the ids field holds something other than dead-letter ids") from None
    if not ids:
        raise Refused(400, "nothing to act on: the preview selected no dead letter")
    if len(ids) > MAX_SELECTION:
        raise Refused(400, f"at most {MAX_SELECTION} dead letters at once from the console")
    try:
        report = await _run(request, action, triage.Filters(ids=ids), identity, dry_run=False)
    except UnknownDeadLetterError as exc:
        raise Refused(400, str(exc)) from None
    if (
        not report.complete
        and not report.ids(resolve.Verdict.REPLAYED)
        and not report.ids(resolve.Verdict.PURGED)
    ):
        return console.render(request, "done.html", status=409, report=report, action=action)
    return RedirectResponse(f"/audit?run={report.run}", status_code=303)


async def pause(request: Request) -> Response:
    """Pause a known consumer, with the user as actor and the form's reason."""
    console = console_of(request)
    identity, form = await _change(request)
    name = _text(form, "consumer")
    known = await pauses.known(console.db, console.schema) | console.consumers
    if name not in known:
        raise Refused(400, f"unknown consumer {name!r}; known: {', '.join(sorted(known))}")
    reason = _text(form, "reason")
    await pauses.pause(console.db, console.schema, name, actor=identity.actor, reason=reason)
    return RedirectResponse("/consumers", status_code=303)


async def resume(request: Request) -> Response:
    """Resume a consumer (nothing happens, and nothing is audited, if it is not paused)."""
    console = console_of(request)
    identity, form = await _change(request)
    await pauses.resume(console.db, console.schema, _text(form, "consumer"), actor=identity.actor)
    return RedirectResponse("/consumers", status_code=303)


async def _change(request: Request, *, operator: bool = True) -> tuple[Identity, FormData]:
    """Return the user and the form of a change; raise Refused without a valid CSRF token."""
    form = await request.form()
    identity = identity_of(request)
    gate = console_of(request).gate
    if operator:
        gate.check_change(identity, _text(form, "csrf"))
    else:  # logging out needs no operator, but still the session's own token
        gate.check_csrf(identity, _text(form, "csrf"))
    return identity, form


async def _run(
    request: Request,
    action: str,
    filters: triage.Filters,
    identity: Identity,
    *,
    dry_run: bool,
) -> resolve.Report:
    console = console_of(request)
    if action == "replay":
        return await resolve.replay(
            console.db,
            console.schema,
            filters,
            outbox=Outbox.from_settings(console.settings),
            actor=identity.actor,
            dry_run=dry_run,
            limit=MAX_SELECTION,
        )
    return await resolve.purge(
        console.db,
        console.schema,
        filters,
        actor=identity.actor,
        confirm=not dry_run,
        dry_run=dry_run,
        limit=MAX_SELECTION,
    )


async def _slices(request: Request, ids: Sequence[int]) -> list[Slice]:
    """Count the dead letters *ids* by consumer and error type, largest first."""
    if not ids:
        return []
    console = console_of(request)
    found = await triage.group_letters(
        console.db, console.schema, triage.Filters(ids=tuple(ids)), limit=10_000
    )
    counts: dict[tuple[str, str], int] = {}
    for group in found:
        key = (group.consumer, group.error_type)
        counts[key] = counts.get(key, 0) + group.count
    return [
        Slice(consumer, error_type, count)
        for (consumer, error_type), count in sorted(counts.items(), key=lambda kv: -kv[1])
    ]


def _action(request: Request) -> str:
    action = str(request.path_params["action"])
    if action not in ("replay", "purge"):
        raise Refused(404, f"no such page: /{action}")
    return action


def _text(form: FormData, name: str) -> str:
    value: Any = form.get(name)
    return value.strip() if isinstance(value, str) else ""


ROUTES = [
    Route("/login", login_form, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/{action:str}/preview", preview, methods=["GET"]),
    Route("/{action:str}/confirm", confirm, methods=["POST"]),
    Route("/consumers/pause", pause, methods=["POST"]),
    Route("/consumers/resume", resume, methods=["POST"]),
]
