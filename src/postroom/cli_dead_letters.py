"""``postroom dead-letters``: list, group, show, replay and purge dead letters.

Exit codes as in :mod:`postroom.cli_ops`: 0 done, 1 nothing matched or some not acted on,
2 usage (bad filters, unknown ids, purge without ``--yes``), 3 database.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from postroom.cli_ops import (
    Actor,
    DryRun,
    Json,
    Since,
    actor_or_user,
    fail,
    print_json,
    print_table,
    run,
    when,
)
from postroom.errors import PostroomError

if TYPE_CHECKING:
    from postroom.resolve import Report
    from postroom.triage import Filters

dead_letters_app = typer.Typer(
    no_args_is_help=True, help="Inspect, group, replay and purge dead letters."
)

Consumer = Annotated[str | None, typer.Option("--consumer", "-c", help="Only this consumer's.")]
Topic = Annotated[str | None, typer.Option(help="Only this topic.")]
ErrorType = Annotated[
    str | None,
    typer.Option("--error-type", "-e", help="Exception name: TimeoutError, httpx.ReadTimeout."),
]
Text = Annotated[
    str | None,
    typer.Option("--text", "-t", help="Text in 'ErrorType: message' (any case, literal)."),
]
Reason = Annotated[
    str | None,
    typer.Option(
        help="rejected, exhausted, undecodable, unknown_topic, too_large or delivery_limit."
    ),
]
Until = Annotated[str | None, typer.Option(help="Dead before: like --since.")]
Status = Annotated[str, typer.Option(help="dead, replayed, purged or all.")]
Ids = Annotated[list[int] | None, typer.Argument(help="Dead-letter ids.", show_default=False)]
All = Annotated[bool, typer.Option("--all", help="Select every dead letter (no filter).")]
Limit = Annotated[int | None, typer.Option(min=1, help="At most this many.")]

SHOWN = 50
"""Rows of a replay or purge report shown to people; --json has them all."""


def _filters(
    consumer: str | None,
    topic: str | None,
    error_type: str | None,
    text: str | None,
    reason: str | None,
    since: str | None,
    until: str | None,
    status: str | None = None,
) -> Filters:
    from postroom.triage import Filters

    try:
        return Filters.parse(
            consumer=consumer,
            topic=topic,
            error_type=error_type,
            text=text,
            reason=reason,
            since=since,
            until=until,
            status=status,
        )
    except PostroomError as exc:
        fail(str(exc))


@dead_letters_app.command("list")
def list_(
    consumer: Consumer = None,
    topic: Topic = None,
    error_type: ErrorType = None,
    text: Text = None,
    reason: Reason = None,
    since: Since = None,
    until: Until = None,
    status: Status = "dead",
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Rows per page.")] = 50,
    before: Annotated[int | None, typer.Option(help="Only ids below this (next page).")] = None,
    as_json: Json = False,
) -> None:
    """List dead letters, newest first."""
    from postroom.triage import list_letters

    filters = _filters(consumer, topic, error_type, text, reason, since, until, status)
    page = run(lambda s, e: list_letters(e, s.schema_name, filters, limit=limit, before=before))
    if as_json:
        print_json(
            {
                "dead_letters": [x.as_json() for x in page.letters],
                "next_before": page.next_before,
            }
        )
        return
    rows = [
        (
            x.id,
            when(x.created_at),
            x.consumer,
            x.reason,
            f"{x.error_type}: {x.error_message}"[:300],
            x.attempts,
            x.replays,
            x.status,
        )
        for x in page.letters
    ]
    columns = ("id", "dead since", "consumer", "reason", "error", "att", "rep", "status")
    print_table(None, columns, rows, fixed=("id", "dead since", "att", "rep", "status"))
    if page.next_before is not None:
        typer.echo(f"older ones: --before {page.next_before}")


@dead_letters_app.command()
def groups(
    consumer: Consumer = None,
    topic: Topic = None,
    error_type: ErrorType = None,
    text: Text = None,
    reason: Reason = None,
    since: Since = None,
    until: Until = None,
    status: Status = "dead",
    as_json: Json = False,
) -> None:
    """Count dead letters by consumer, error type and error shape (numbers, ids elided)."""
    from postroom.triage import group_letters

    filters = _filters(consumer, topic, error_type, text, reason, since, until, status)
    found = run(lambda s, e: group_letters(e, s.schema_name, filters))
    if as_json:
        print_json({"groups": [g.as_json() for g in found]})
        return
    rows = [
        (
            g.count,
            g.consumer,
            g.error_type,
            g.shape,
            f"{g.first_seen:%m-%d %H:%M}",
            f"{g.last_seen:%m-%d %H:%M}",
            g.latest_id,
        )
        for g in found
    ]
    columns = ("count", "consumer", "error type", "message shape", "first", "last", "latest id")
    print_table(None, columns, rows, fixed=("count", "first", "last", "latest id"))


@dead_letters_app.command()
def show(
    letter_id: Annotated[int, typer.Argument(metavar="ID", help="Dead-letter id.")],
    as_json: Json = False,
) -> None:
    """Show one whole dead letter: reason, traceback, attempts, times, headers, body."""
    import base64

    from postroom.triage import get_letter

    detail = run(lambda s, e: get_letter(e, s.schema_name, letter_id))
    try:
        body, encoding = detail.body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(detail.body).decode("ascii"), "base64"
    if as_json:
        shown = detail.letter.as_json()
        shown.update(
            traceback=detail.traceback,
            headers=dict(detail.headers),
            body=body,
            body_encoding=encoding,
            content_type=detail.content_type,
            correlation_id=detail.correlation_id,
        )
        print_json(shown)
        return
    from rich.console import Console

    out = Console(highlight=False)
    for name, value in detail.letter.as_json().items():
        out.print(f"[bold]{name}[/]: {value}", soft_wrap=True, markup=True)
    for name in ("content_type", "correlation_id"):
        out.print(f"[bold]{name}[/]: {getattr(detail, name)}", markup=True)
    out.print("[bold]headers[/]:", markup=True)
    out.print_json(json.dumps(dict(detail.headers), default=str))
    out.print(f"[bold]body[/] ({encoding}, {len(detail.body)} bytes):", markup=True)
    try:
        out.print_json(body)
    except json.JSONDecodeError:  # not JSON (or base64): print it as it is
        out.print(body, markup=False)
    out.print("[bold]traceback[/]:", markup=True)
    out.print(detail.traceback or "(none)", markup=False)


def _selection(ids: list[int] | None, every: bool, filters: Filters) -> Filters:
    from dataclasses import replace

    chosen = replace(filters, ids=tuple(dict.fromkeys(ids or ())))
    if not chosen.narrows and not every:
        fail("say which dead letters: ids, a filter (--consumer, --error-type, ...) or --all")
    return chosen


def _progress(label: str) -> tuple[Any, Callable[[int, int], None]]:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    bar = Progress(console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def _report(report: Report, as_json: bool) -> None:
    from postroom.resolve import Verdict

    if as_json:
        print_json(report.as_json())
    else:
        verb = "would be " if report.dry_run else ""
        counts = ", ".join(
            f"{len(report.ids(v))} {verb}{v.value}" for v in Verdict if report.ids(v)
        )
        # What was not acted on comes first: that is what needs a person.
        items = sorted(report.items, key=lambda i: i.verdict in (Verdict.REPLAYED, Verdict.PURGED))
        shown = [(i.id, i.consumer, i.message_id, i.verdict.value, i.detail) for i in items]
        if shown:
            title = "dry run: nothing changed" if report.dry_run else None
            columns = ("id", "consumer", "message id", "verdict", "detail")
            fixed = ("id", "message id", "verdict")
            print_table(title, columns, shown[:SHOWN], fixed=fixed)
        if len(shown) > SHOWN:
            typer.echo(f"... and {len(shown) - SHOWN} more (see --json)")
        typer.echo(counts or "no dead letter matched", err=not counts)
    if not report.complete:
        raise typer.Exit(1)


@dead_letters_app.command()
def replay(
    ids: Ids = None,
    consumer: Consumer = None,
    topic: Topic = None,
    error_type: ErrorType = None,
    text: Text = None,
    reason: Reason = None,
    since: Since = None,
    until: Until = None,
    every: All = False,
    dry_run: DryRun = False,
    limit: Limit = None,
    rate: Annotated[
        float | None, typer.Option(min=0.1, help="At most this many per second.")
    ] = None,
    max_replays: Annotated[
        int, typer.Option(min=1, help="Loop guard: flag, don't replay, after this many replays.")
    ] = 3,
    force: Annotated[bool, typer.Option("--force", help="Replay past the loop guard.")] = False,
    actor: Actor = None,
    as_json: Json = False,
) -> None:
    """Send dead letters back to the consumer that failed them, and to no other.

    Interrupted? Run the same command again: it carries on where it stopped.
    """
    from postroom.outbox import Outbox
    from postroom.resolve import replay as run_replay

    filters = _selection(
        ids,
        every,
        _filters(consumer, topic, error_type, text, reason, since, until),
    )
    bar, progress = _progress("replaying")
    with bar:
        report = run(
            lambda s, e: run_replay(
                e,
                s.schema_name,
                filters,
                outbox=Outbox.from_settings(s),
                actor=actor_or_user(actor),
                dry_run=dry_run,
                limit=limit,
                rate=rate,
                max_replays=max_replays,
                force=force,
                progress=progress,
            )
        )
    _report(report, as_json)


@dead_letters_app.command()
def purge(
    ids: Ids = None,
    consumer: Consumer = None,
    topic: Topic = None,
    error_type: ErrorType = None,
    text: Text = None,
    reason: Reason = None,
    since: Since = None,
    until: Until = None,
    every: All = False,
    dry_run: DryRun = False,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: really purge.")] = False,
    limit: Limit = None,
    actor: Actor = None,
    as_json: Json = False,
) -> None:
    """Give up on dead letters: mark them purged (kept for the retention period, audited)."""
    from postroom.resolve import purge as run_purge

    filters = _selection(
        ids,
        every,
        _filters(consumer, topic, error_type, text, reason, since, until),
    )
    if not (yes or dry_run):
        fail("purge needs --yes (or --dry-run to see what it would purge)")
    bar, progress = _progress("purging")
    with bar:
        report = run(
            lambda s, e: run_purge(
                e,
                s.schema_name,
                filters,
                actor=actor_or_user(actor),
                confirm=yes,
                dry_run=dry_run,
                limit=limit,
                progress=progress,
            )
        )
    _report(report, as_json)
