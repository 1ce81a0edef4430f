"""``postroom consumers``: list consumers with their paused state, pause and resume them.

A pause is the kill switch: every worker stops taking that consumer's messages within
``POSTROOM_PAUSE_POLL_INTERVAL`` seconds; they wait in its queue until ``resume``.
Exit codes as in :mod:`postroom.cli_ops`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from postroom.cli_ops import Actor, Json, actor_or_user, fail, print_json, print_table, run, when
from postroom.errors import PostroomError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from postroom.pauses import Pause
    from postroom.router import Router
    from postroom.settings import Settings

consumers_app = typer.Typer(no_args_is_help=True, help="List, pause and resume consumers.")

Name = Annotated[str, typer.Argument(metavar="NAME", help="The consumer's name.")]
RouterPath = Annotated[
    str | None,
    typer.Option(
        "--router",
        help="Import path of the Router, e.g. billing.consumers:router, to list "
        "and check its consumers.",
    ),
]


def _router(path: str | None) -> Router | None:
    if path is None:
        return None
    from postroom.loader import load_router

    try:
        return load_router(path)
    except PostroomError as exc:
        fail(str(exc))


@consumers_app.command("list")
def list_(router: RouterPath = None, as_json: Json = False) -> None:
    """List the consumers (of ROUTER, and those this database has seen), paused or not."""
    from postroom import pauses

    declared = {c.name for c in _router(router) or ()}

    async def work(settings: Settings, engine: AsyncEngine) -> tuple[dict[str, Pause], set[str]]:
        schema = settings.schema_name
        return await pauses.paused(engine, schema), await pauses.known(engine, schema)

    paused, seen = run(work)
    names = sorted(declared | seen)
    if as_json:
        print_json(
            {
                "consumers": [
                    {"consumer": n, "paused": n in paused, "pause": _json(paused.get(n))}
                    for n in names
                ]
            }
        )
        return
    rows = []
    for name in names:
        p = paused.get(name)
        state = "paused" if p else "running"
        rows.append((name, state, p and when(p.paused_at), p and p.actor, p and p.reason))
    print_table(None, ("consumer", "state", "since", "by", "reason"), rows, fixed=("state",))


def _json(pause: Pause | None) -> object:
    return None if pause is None else pause.as_json()


@consumers_app.command()
def pause(
    name: Name,
    reason: Annotated[str, typer.Option(help="Why, for the audit trail and the console.")] = "",
    router: RouterPath = None,
    force: Annotated[
        bool, typer.Option("--force", help="Pause a name this database has never seen.")
    ] = False,
    actor: Actor = None,
    as_json: Json = False,
) -> None:
    """Stop every worker taking NAME's messages (within seconds); they wait in its queue."""
    from postroom import pauses

    loaded = _router(router)
    declared = {c.name for c in loaded or ()}
    if loaded is not None and name not in declared and not force:
        fail(f"{router} has no consumer {name!r}; known: {', '.join(sorted(declared))}")

    async def work(settings: Settings, engine: AsyncEngine) -> tuple[Pause, bool]:
        if loaded is None and not force:
            seen = await pauses.known(engine, settings.schema_name)
            if name not in seen:
                known = ", ".join(sorted(seen)) or "none yet"
                raise PostroomError(
                    f"no consumer {name!r} has handled or failed a message here (known: "
                    f"{known}); check the name, give --router to check it against the "
                    "router, or --force for a consumer not deployed yet"
                )
        return await pauses.pause(
            engine, settings.schema_name, name, actor=actor_or_user(actor), reason=reason
        )

    current, changed = run(work)
    if as_json:
        print_json({"changed": changed, "pause": current.as_json()})
        return
    if changed:
        typer.echo(f"paused {name}: workers stop taking its messages within seconds")
    else:
        typer.echo(
            f"{name} was already paused since {current.paused_at:%Y-%m-%d %H:%M:%S} UTC "
            f"by {current.actor}" + (f" ({current.reason})" if current.reason else "")
        )


@consumers_app.command()
def resume(name: Name, actor: Actor = None, as_json: Json = False) -> None:
    """Let workers take NAME's messages again; its queued messages drain."""
    from postroom import pauses

    lifted = run(lambda s, e: pauses.resume(e, s.schema_name, name, actor=actor_or_user(actor)))
    if as_json:
        print_json({"changed": lifted is not None, "pause": lifted and lifted.as_json()})
    elif lifted is None:
        typer.echo(f"{name} is not paused; nothing changed", err=True)
    else:
        typer.echo(f"resumed {name} (paused since {lifted.paused_at:%Y-%m-%d %H:%M:%S} UTC)")
    if lifted is None:
        raise typer.Exit(1)
