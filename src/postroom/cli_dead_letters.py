"""``postroom dead-letters``: list, group and show dead letters; the changes register here.

The commands that change dead letters live in :mod:`postroom.cli_replay` (replay, edit,
status) and :mod:`postroom.cli_purge` (purge, unpurge). Exit codes as in
:mod:`postroom.cli_ops`: 0 done, 1 nothing matched or some not acted on, 2 usage (bad
filters, unknown names or ids, a change that needs ``--yes``), 3 database.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from postroom import cli_purge, cli_replay
from postroom.cli_filters import RouterSpec, filtered, router_of
from postroom.cli_ops import Json, print_json, print_table, run, when
from postroom.filters import Filters

dead_letters_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: typer's rich panels show flags as "--yes <bool>"
    help="Inspect, group, replay and purge dead letters.",
)


@dead_letters_app.command("list")
@filtered(status="dead")
def list_(
    filters: Filters,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Rows per page.")] = 50,
    before: Annotated[int | None, typer.Option(help="Only ids below this (next page).")] = None,
    router: RouterSpec = None,
    as_json: Json = False,
) -> None:
    """List dead letters, newest first."""
    from postroom.lookup import list_letters

    loaded = router_of(router)
    page = run(
        lambda s, e: list_letters(
            e, s.schema_name, filters, limit=limit, before=before, router=loaded
        )
    )
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
@filtered(status="dead")
def groups(
    filters: Filters,
    router: RouterSpec = None,
    as_json: Json = False,
) -> None:
    """Count dead letters by status, consumer, error type and error shape (numbers elided)."""
    from postroom.lookup import group_letters

    loaded = router_of(router)
    found = run(lambda s, e: group_letters(e, s.schema_name, filters, router=loaded))
    if as_json:
        print_json({"groups": [g.as_json() for g in found]})
        return
    rows = [
        (
            g.count,
            g.status,
            g.consumer,
            g.error_type,
            g.shape,
            f"{g.first_seen:%m-%d %H:%M}",
            f"{g.last_seen:%m-%d %H:%M}",
            g.latest_id,
        )
        for g in found
    ]
    columns = (
        "count",
        "status",
        "consumer",
        "error type",
        "message shape",
        "first",
        "last",
        "latest id",
    )
    print_table(None, columns, rows, fixed=("count", "status", "first", "last", "latest id"))


@dead_letters_app.command()
def show(
    letter_id: Annotated[int, typer.Argument(metavar="ID", help="Dead-letter id.")],
    router: RouterSpec = None,
    as_json: Json = False,
) -> None:
    """Show one whole dead letter: reason, traceback, headers, body, and its chain of replays."""
    import base64

    from postroom.lookup import get_letter

    loaded = router_of(router)
    detail = run(lambda s, e: get_letter(e, s.schema_name, letter_id, router=loaded))
    try:
        body, encoding = detail.body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(detail.body).decode("ascii"), "base64"
    chain = [(x.id, when(x.created_at), x.status, x.replays, x.error_type) for x in detail.chain]
    if as_json:
        shown = detail.letter.as_json()
        shown.update(
            traceback=detail.traceback,
            headers=dict(detail.headers),
            body=body,
            body_encoding=encoding,
            content_type=detail.content_type,
            correlation_id=detail.correlation_id,
            chain=[x.as_json() for x in detail.chain],
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
    if len(chain) > 1:
        print_table(
            "this message's chain (every dead letter it became, oldest first)",
            ("id", "dead since", "status", "rep", "error type"),
            chain,
            fixed=("id", "dead since", "status", "rep"),
        )


dead_letters_app.command()(cli_replay.replay)
dead_letters_app.command()(cli_replay.edit)
dead_letters_app.command()(cli_purge.purge)
dead_letters_app.command()(cli_purge.unpurge)
dead_letters_app.command()(cli_replay.status)
