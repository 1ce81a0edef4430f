"""``postroom outbox list|show|retry|discard``: see pending outbox rows and act on them.

``outbox status`` (in :mod:`postroom.cli_ops`) is the overview; these reach single rows.
Exit codes as in :mod:`postroom.cli_ops`: 0 done, 1 nothing matched, 2 usage (a bulk
change without ``--yes`` off a terminal, a bad filter), 3 database.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from postroom.cli_ops import (
    Actor,
    DryRun,
    Json,
    actor_or_user,
    fail,
    options,
    print_json,
    print_table,
    run,
)
from postroom.cli_ops import when as short_time
from postroom.errors import PostroomError
from postroom.pending import RowFilters

if TYPE_CHECKING:
    from postroom.pending import Change, PendingRow

Ids = Annotated[list[int] | None, typer.Argument(help="Outbox row ids.", show_default=False)]
Topic = Annotated[str | None, typer.Option(help="Only this topic.")]
RoutingKey = Annotated[
    str | None,
    typer.Option("--routing-key", help="Only this routing key (a consumer's, for retries)."),
]
Kind = Annotated[
    str | None,
    typer.Option(help="event (to the events exchange) or direct (a retry or replay)."),
]
Errored = Annotated[bool, typer.Option("--errored", help="Only rows whose last publish failed.")]
ErrorText = Annotated[str | None, typer.Option("--error", help="Text in the last publish error.")]
OlderThan = Annotated[
    str | None, typer.Option(help="Written before: ISO time or an age (90m, 2d).")
]
All = Annotated[bool, typer.Option("--all", help="Select every row (no filter).")]
Yes = Annotated[bool, typer.Option("--yes", help="Confirm a change of several rows.")]

SHOWN = 50


def _filters(
    ids: list[int] | None,
    topic: str | None,
    routing_key: str | None,
    kind: str | None,
    errored: bool,
    error: str | None,
    older_than: str | None,
    every: bool = False,
) -> RowFilters:
    from postroom.filters import parse_time
    from postroom.pending import RowFilters

    try:
        before = parse_time(older_than, name="--older-than") if older_than else None
        return RowFilters(
            ids=tuple(ids or ()),
            topic=topic,
            routing_key=routing_key,
            kind=kind,
            errored=errored,
            text=error,
            older_than=before,
            every=every,
        )
    except PostroomError as exc:
        fail(str(exc))


_ROW_OPTIONS: dict[str, tuple[object, object]] = {
    "ids": (Ids, None),
    "topic": (Topic, None),
    "routing_key": (RoutingKey, None),
    "kind": (Kind, None),
    "errored": (Errored, False),
    "error": (ErrorText, None),
    "older_than": (OlderThan, None),
}
listing = options("filters", _ROW_OPTIONS, _filters)
"""The row filters of ``outbox list``, parsed into the command's ``filters``."""
selecting = options("filters", {**_ROW_OPTIONS, "every": (All, False)}, _filters)
"""The same and ``--all``, for the commands that change rows."""


@listing
def list_rows(
    filters: RowFilters,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 50,
    as_json: Json = False,
) -> None:
    """List pending outbox rows, oldest first: topic, attempts, next try, last error."""
    from postroom.pending import rows

    found = run(lambda s, e: rows(e, s.schema_name, filters, limit=limit))
    if as_json:
        print_json({"rows": [row.as_json() for row in found]})
    else:
        _table(found)
    if not found:
        raise typer.Exit(1)


def show_row(
    row_id: Annotated[int, typer.Argument(help="Outbox row id.")], as_json: Json = False
) -> None:
    """Show one outbox row: routing, attempts, last error, headers and body."""
    from postroom.pending import show

    shown = run(lambda s, e: show(e, s.schema_name, row_id))
    if shown is None:
        fail(f"no outbox row {row_id} (published, discarded, or never there)", 1)
    body: bytes = shown.pop("body")
    try:
        shown["body"] = json.loads(body)
    except ValueError:
        shown["body_base64"] = base64.b64encode(body).decode()
    if as_json:
        print_json(shown)
        return
    for key, value in shown.items():
        if key in ("headers", "body"):
            continue
        typer.echo(f"{key:<15} {value}")
    typer.echo(f"headers         {json.dumps(shown['headers'], indent=2, sort_keys=True)}")
    if "body" in shown:
        typer.echo(f"body            {json.dumps(shown['body'], indent=2)}")


@selecting
def retry(
    filters: RowFilters,
    dry_run: DryRun = False,
    yes: Yes = False,
    actor: Actor = None,
    as_json: Json = False,
) -> None:
    """Make rows due now, so the relay tries them at once (after deploying their consumer)."""
    from postroom.pending import retry as run_retry

    _confirm(filters, "retry", dry_run=dry_run, yes=yes)
    change = run(
        lambda s, e: run_retry(
            e, s.schema_name, filters, actor=actor_or_user(actor), dry_run=dry_run
        )
    )
    _report(change, as_json, "retried" if not dry_run else "would be retried")


@selecting
def discard(
    filters: RowFilters,
    dry_run: DryRun = False,
    yes: Yes = False,
    actor: Actor = None,
    as_json: Json = False,
) -> None:
    """Delete rows on purpose: their events are never sent. Audited (`postroom audit`)."""
    from postroom.pending import discard as run_discard

    _confirm(filters, "discard", dry_run=dry_run, yes=yes)
    change = run(
        lambda s, e: run_discard(
            e, s.schema_name, filters, actor=actor_or_user(actor), dry_run=dry_run
        )
    )
    _report(change, as_json, "discarded" if not dry_run else "would be discarded")


def _confirm(filters: RowFilters, verb: str, *, dry_run: bool, yes: bool) -> None:
    """Refuse an empty selection; ask before changing several rows (or want --yes)."""
    from postroom.pending import count

    if filters.empty:
        fail(f"{verb} what? give row ids, filters, or --all")
    if dry_run or yes:
        return
    matched = run(lambda s, e: count(e, s.schema_name, filters))
    if matched <= 1 and filters.ids:
        return  # one row named by its id: the command line is the confirmation
    if not sys.stdin.isatty():
        fail(f"{verb} of {matched} rows needs --yes (or --dry-run to see them first)")
    if not typer.confirm(f"{verb} {matched} outbox rows?"):
        raise typer.Exit(1)


def _report(change: Change, as_json: bool, verb: str) -> None:
    if as_json:
        print_json(change.as_json())
    else:
        if change.dry_run:
            typer.echo("dry run: nothing changed\n")
        _table(change.rows[:SHOWN])
        more = f" (first {SHOWN} shown; --json has all)" if len(change.rows) > SHOWN else ""
        typer.echo(f"{len(change.rows)} {verb}{more}")
    if not change.rows:
        raise typer.Exit(1)


def _table(found: Any) -> None:
    rows: list[PendingRow] = list(found)
    print_table(
        None,
        ("id", "written", "topic", "kind", "routing key", "att", "next try", "last error"),
        [
            (
                r.id,
                short_time(r.created_at),
                r.topic,
                r.kind,
                r.routing_key,
                r.attempts,
                short_time(r.available_at),
                (r.last_error or "")[:120],
            )
            for r in rows
        ],
        fixed=("id", "written", "att", "next try"),
    )
