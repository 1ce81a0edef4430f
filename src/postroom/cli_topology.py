"""``postroom topology show|delete ROUTER``: a router's queues, bindings and exchanges.

Exit codes: 0 done; 1 refused (a queue holds messages or has consumers, an exchange is
still in use) or, for ``show``, something is missing; 2 usage; 3 the broker is unreachable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from postroom.cli_ops import DryRun, Json, fail, print_table
from postroom.errors import ConfigError, PostroomError, TopologyRefusedError
from postroom.settings import Settings

if TYPE_CHECKING:
    from postroom.router import Router
    from postroom.topology import Item

T = TypeVar("T")

topology_app = typer.Typer(
    no_args_is_help=True, help="Show or delete a router's queues, bindings and exchanges."
)

RouterArg = Annotated[
    str, typer.Argument(help="Import path of a Router, e.g. billing.consumers:router.")
]
AppDir = Annotated[
    str | None, typer.Option("--app-dir", help="Look for ROUTER's module here first.")
]


def _run(
    router: str, app_dir: str | None, work: Callable[[Settings, Router], Coroutine[Any, Any, T]]
) -> T:
    from postroom.loader import load_router
    from postroom.rabbit import BrokerError

    try:
        settings = Settings.from_env()
        loaded = load_router(router, app_dir=app_dir)
    except ConfigError as exc:
        fail(str(exc))
    try:
        return asyncio.run(work(settings, loaded))
    except TopologyRefusedError as exc:
        fail(str(exc), 1)
    except PostroomError as exc:
        fail(str(exc))
    except (OSError, BrokerError) as exc:
        url = settings.broker.redacted
        fail(f"cannot reach the broker at {url}: {type(exc).__name__}: {exc}", 3)


@topology_app.command()
def show(router: RouterArg, app_dir: AppDir = None, as_json: Json = False) -> None:
    """Show ROUTER's queues (messages, consumers), bindings and exchanges on the broker."""
    from postroom.topology import inspect

    items = _run(router, app_dir, inspect)
    _print(items, as_json)
    if not all(item.exists for item in items):
        raise typer.Exit(1)


@topology_app.command()
def delete(
    router: RouterArg,
    app_dir: AppDir = None,
    exchanges: Annotated[
        bool,
        typer.Option(
            "--exchanges", help="Delete the events and dead-letter exchanges too, if unused."
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Delete queues holding messages (they are lost) and exchanges still in use.",
        ),
    ] = False,
    dry_run: DryRun = False,
    as_json: Json = False,
) -> None:
    """Delete ROUTER's queues and .dead queues (with their bindings); refuses busy queues."""
    from postroom.topology import delete as run_delete

    items = _run(
        router,
        app_dir,
        lambda s, r: run_delete(s, r, exchanges=exchanges, force=force, dry_run=dry_run),
    )
    if dry_run and not as_json:
        typer.echo("dry run: nothing changed\n")
    _print(items, as_json)
    if any(item.action.startswith("kept:") for item in items):
        raise typer.Exit(1)


def _print(items: list[Item], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"topology": [item.as_json() for item in items]}, indent=2))
        return
    rows: list[tuple[object, ...]] = [
        (
            item.kind,
            item.name,
            "yes" if item.exists else "no",
            item.messages if item.kind.endswith("queue") else "",
            item.consumers if item.kind.endswith("queue") else "",
            item.detail,
            item.action,
        )
        for item in items
    ]
    columns: tuple[str, ...] = ("kind", "name", "exists", "messages", "consumers", "detail")
    if any(item.action for item in items):
        columns += ("action",)
    else:  # show: nothing was acted on
        rows = [row[:-1] for row in rows]
    print_table(None, columns, rows, fixed=("kind", "exists", "messages", "consumers"))
