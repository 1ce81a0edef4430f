"""The console's changes: log in and out; replay, purge, un-purge (preview, confirm); pauses.

Every change is a POST that passes :meth:`Gate.check_change` first (an operator, with the
session's CSRF token). A replay, purge or un-purge is two steps: the preview is the real
function's dry run (:func:`postroom.replay.replay`, :func:`postroom.purge.purge`,
:func:`postroom.purge.unpurge` with ``dry_run=True``) and its breakdown by consumer and
error type; the confirmation acts on exactly the dead letters the preview listed (their
ids), never on what a filter matches by then, so a dead letter that arrived in between is
not swept along unseen. The confirmation is the run's confirmation (``confirm=True``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from postroom import lookup, pauses, purge, replay
from postroom.console.auth import COOKIE, Identity, Refused, set_session
from postroom.console.state import console_of, identity_of
from postroom.console.views import filters_of, query_of
from postroom.deadletters import DeadStatus
from postroom.errors import InvalidFilterError, UnknownDeadLetterError
from postroom.filters import Filters
from postroom.outbox import Outbox
from postroom.runs import DONE, Report

MAX_SELECTION = 5000
"""Dead letters one console run may act on; the CLI takes more, in batches."""

ACTS_ON = {"replay": DeadStatus.DEAD, "purge": DeadStatus.DEAD, "unpurge": DeadStatus.PURGED}
"""Each action, and the status of the dead letters it acts on."""


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
    """Show exactly what a replay, purge or un-purge of the filtered dead letters would do."""
    console = console_of(request)
    action = _action(request)
    params = request.query_params
    acts_on = ACTS_ON[action]
    try:
        filters = filters_of(params, status=acts_on.value)
    except InvalidFilterError as exc:
        return console.render(request, "refused.html", status=400, why=str(exc))
    if filters.status is not acts_on:
        why = f"{action} acts on {acts_on.value} dead letters only"
        return console.render(request, "refused.html", status=400, why=why)
    if not filters.narrows and params.get("all") != "1":
        why = "say which dead letters: a filter, or all of them (all=1)"
        return console.render(request, "refused.html", status=400, why=why)
    try:
        report = await _run(request, action, filters, identity_of(request), dry_run=True)
    except (InvalidFilterError, UnknownDeadLetterError) as exc:
        return console.render(request, "refused.html", status=400, why=str(exc))
    chosen = [item.id for item in report.items if item.verdict in DONE]
    breakdown = report.breakdown()
    everyone = await lookup.group_letters(
        console.db, console.schema, Filters(status=acts_on), limit=10_000
    )
    untouched = sorted({g.consumer for g in everyone} - {row[0] for row in breakdown})
    held = [item for item in report.items if item.verdict not in DONE]
    return console.render(
        request,
        "preview.html",
        action=action,
        verb={"replay": "replayed", "purge": "purged", "unpurge": "restored"}[action],
        report=report,
        chosen=chosen,
        breakdown=breakdown,
        untouched=untouched,
        held=held[:50],
        held_count=len(held),
        criteria=filters.as_json(),
        query=query_of(params),
        capped=len(report.items) >= MAX_SELECTION,
        limit=MAX_SELECTION,
    )


async def confirm(request: Request) -> Response:
    """Replay, purge or un-purge exactly the dead letters the preview listed."""
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
    selection = Filters(ids=ids, status=ACTS_ON[action])
    try:
        report = await _run(request, action, selection, identity, dry_run=False)
    except (InvalidFilterError, UnknownDeadLetterError) as exc:
        raise Refused(400, str(exc)) from None
    if not any(item.verdict in DONE for item in report.items):
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
    filters: Filters,
    identity: Identity,
    *,
    dry_run: bool,
) -> Report:
    """Call the ops library's run for *action*; a real run is confirmed (by the preview)."""
    console = console_of(request)
    common: dict[str, Any] = {
        "actor": identity.actor,
        "dry_run": dry_run,
        "limit": MAX_SELECTION,
        "router": console.router,
    }
    if action == "replay":
        return await replay.replay(
            console.db,
            console.schema,
            filters,
            outbox=Outbox.from_settings(console.settings),
            confirm=not dry_run,
            **common,
        )
    if action == "purge":
        return await purge.purge(console.db, console.schema, filters, confirm=not dry_run, **common)
    retention = timedelta(days=console.settings.dead_letter_retention_days)
    return await purge.unpurge(console.db, console.schema, filters, retention=retention, **common)


def _action(request: Request) -> str:
    action = str(request.path_params["action"])
    if action not in ACTS_ON:
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
