"""Shared pieces of the ops commands, and ``outbox status``, ``prune`` and ``audit``.

The ops commands (these and ``postroom dead-letters``, in :mod:`postroom.cli_dead_letters`)
print tables for people, JSON for scripts (``--json``), progress bars on stderr. Exit codes:

- 0: done; everything selected was acted on (``list``, ``show`` and ``status`` answered).
- 1: nothing matched, or some selected dead letters were not acted on (refused, held by
  the loop guard, already resolved); ``outbox status --max-lag`` exceeded.
- 2: usage: bad options or filters, unknown ids, purge without ``--yes``, bad settings.
- 3: the database could not be reached or refused (not migrated? wrong URL? locked?).
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from postroom.errors import ConfigError, PostroomError
from postroom.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")

outbox_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Look at the outbox; retry or discard rows that wait.",
)

Since = Annotated[
    str | None, typer.Option(help="Since: ISO time (UTC unless offset) or age: 90m, 2d.")
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would happen; change nothing.")]

Actor = Annotated[
    str | None, typer.Option(help="Who acts, for the audit trail (default: the OS user).")
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def options(
    name: str, declared: Mapping[str, tuple[Any, Any]], build: Callable[..., Any]
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Declare a group of options once and hand a command their parsed value as *name*.

    Typer reads a command's options from its signature, so several commands sharing a
    filter would each repeat it option by option, then call the same parser: the
    copies drift. The command takes one parameter *name*; this decorator puts the
    *declared* options (name -> (annotation, default)) in its place in the signature
    Typer sees, and calls the command with ``build(**their values)`` as *name*.
    """

    def decorate(command: Callable[..., T]) -> Callable[..., T]:
        own = inspect.signature(command, eval_str=True)
        parameters: list[inspect.Parameter] = []
        for parameter in own.parameters.values():
            if parameter.name != name:
                parameters.append(parameter)
                continue
            parameters += [
                inspect.Parameter(
                    option,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=default,
                    annotation=annotation,
                )
                for option, (annotation, default) in declared.items()
            ]

        @functools.wraps(command)
        def wrapper(**given: Any) -> T:
            grouped = {option: given.pop(option) for option in declared}
            return command(**given, **{name: build(**grouped)})

        wrapper.__signature__ = own.replace(  # type: ignore[attr-defined]
            parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in parameters]
        )
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


def fail(message: str, code: int = 2) -> NoReturn:
    """Print *message* to stderr and exit with *code* (as postroom.cli does)."""
    typer.secho(f"postroom: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def run(work: Callable[[Settings, AsyncEngine], Awaitable[T]]) -> T:
    """Run *work* against the configured database; failures propagate to the CLI's answer."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        fail(str(exc))

    async def main() -> T:
        engine = settings.database.engine(application_name="postroom-ops", pool_size=2)
        try:
            return await work(settings, engine)
        finally:
            await engine.dispose()

    # Failures end in postroom.cli's one-line answer (postroom.diagnosis.explain).
    return asyncio.run(main())


def actor_or_user(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def print_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    fixed: Sequence[str] = (),
) -> None:
    """Print a table to stdout; the *fixed* columns (ids, times, counts) never wrap."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in columns:
        table.add_column(column, no_wrap=column in fixed, overflow="fold")
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    Console(highlight=False).print(table)


def when(value: Any) -> str:
    """A time, short: UTC to the second."""
    from datetime import UTC

    return f"{value.astimezone(UTC):%m-%d %H:%M:%S}"


@outbox_app.command()
def status(
    max_lag: Annotated[
        float | None, typer.Option(help="Exit 1 if the oldest due row waited longer (seconds).")
    ] = None,
    as_json: Json = False,
) -> None:
    """Show pending outbox rows per topic, the oldest one's wait and publish errors."""
    from postroom.lag import outbox_status

    state = run(lambda s, e: outbox_status(e, s.schema_name))
    if as_json:
        print_json(state.as_json())
    else:
        typer.echo(
            f"due {state.due}, scheduled {state.scheduled}, errored {state.errored}, "
            f"retries and replays {state.direct}; oldest due row waiting "
            f"{state.oldest_due_seconds:.1f}s"
        )
        if state.topics:
            rows = [
                (t.topic, t.due, t.scheduled, t.errored, f"{t.oldest_due_seconds:.1f}")
                for t in state.topics
            ]
            print_table(
                None,
                ("topic", "due", "scheduled", "errored", "oldest due (s)"),
                rows,
                fixed=("due", "scheduled", "errored", "oldest due (s)"),
            )
        if state.failures:
            failures = [
                (f.id, f.topic, f.routing_key, f.attempts, when(f.available_at), f.last_error)
                for f in state.failures
            ]
            print_table(
                "latest publish errors",
                ("id", "topic", "routing key", "attempts", "next try", "last error"),
                failures,
                fixed=("id", "attempts", "next try"),
            )
            typer.echo("all of them: postroom outbox list --errored")
    if max_lag is not None and state.oldest_due_seconds > max_lag:
        raise typer.Exit(1)


def prune(
    dry_run: DryRun = False,
    batch_size: Annotated[
        int, typer.Option(min=1, max=50_000, help="Rows per transaction.")
    ] = 1000,
    inbox_days: Annotated[
        float | None, typer.Option(min=0, help="Inbox dedupe window (default: settings).")
    ] = None,
    dead_letter_days: Annotated[
        float | None,
        typer.Option(min=0, help="Keep replayed/purged dead letters (default: settings)."),
    ] = None,
    lock_timeout: Annotated[
        float, typer.Option(min=0.01, help="Seconds to wait for a lock before backing off.")
    ] = 2.0,
    actor: Actor = None,
    as_json: Json = False,
    vacuum: Annotated[
        bool,
        typer.Option(
            "--vacuum",
            help="Then VACUUM (ANALYZE) the outbox, inbox and dead letters: for servers "
            "running without autovacuum.",
        ),
    ] = False,
) -> None:
    """Delete old inbox rows and old replayed/purged dead letters, in small batches.

    Safe beside running relays and workers: schedule it, hourly say.
    """
    from postroom.prune import prune as run_prune
    from postroom.prune import vacuum as run_vacuum

    async def work(settings: Settings, engine: AsyncEngine) -> Any:
        inbox = settings.inbox_retention_days if inbox_days is None else inbox_days
        letters = settings.dead_letter_retention_days
        report = await run_prune(
            engine,
            settings.schema_name,
            actor=actor_or_user(actor),
            dry_run=dry_run,
            inbox_retention=timedelta(days=inbox),
            dead_letter_retention=timedelta(
                days=letters if dead_letter_days is None else dead_letter_days
            ),
            batch_size=batch_size,
            lock_timeout=timedelta(seconds=lock_timeout),
        )
        if vacuum and not dry_run:
            await run_vacuum(engine, settings.schema_name)
        return report

    report = run(work)
    if as_json:
        print_json(report.as_json())
        return
    verb = "would delete" if dry_run else "deleted"
    typer.echo(
        f"{verb} {report.inbox} inbox rows processed before {report.inbox_before:%Y-%m-%d %H:%M} "
        f"and {report.dead_letters} dead letters resolved before "
        f"{report.dead_letters_before:%Y-%m-%d %H:%M} (UTC)"
    )


def audit(
    action: Annotated[
        str | None,
        typer.Option(
            help="dead_letters.replay, dead_letters.edit_replay, dead_letters.purge, "
            "dead_letters.unpurge or prune."
        ),
    ] = None,
    actor: Annotated[str | None, typer.Option(help="Only this actor's.")] = None,
    since: Since = None,
    target: Annotated[
        int | None,
        typer.Option("--id", help="Only rows naming this dead letter or its chain of replays."),
    ] = None,
    message_id: Annotated[
        str | None,
        typer.Option("--message-id", "-m", help="Only rows naming a dead letter of this message."),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option("--run", help="Only this run (its first 8 characters will do).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 50,
    as_json: Json = False,
) -> None:
    """List what the ops commands changed, who did it and when: one row per command run."""
    from postroom.audit import entries
    from postroom.filters import parse_time

    try:
        start = parse_time(since, name="--since") if since else None
    except PostroomError as exc:
        fail(str(exc))
    found = run(
        lambda s, e: entries(
            e,
            s.schema_name,
            action=action,
            actor=actor,
            since=start,
            target=target,
            run=run_id,
            message_id=message_id,
            limit=limit,
        )
    )
    if as_json:
        print_json({"audit": [entry.as_json() for entry in found]})
        return
    rows = []
    for entry in found:
        ids = ", ".join(map(str, entry.target_ids[:8])) + (
            " ..." if len(entry.target_ids) > 8 else ""
        )
        run_name = (entry.run or "")[:8]
        rows.append(
            (
                entry.id,
                when(entry.at),
                entry.actor,
                entry.action,
                run_name,
                entry.count,
                ids,
                _flat(entry.details),
            )
        )
    columns = ("id", "at", "actor", "action", "run", "count", "ids", "details")
    print_table(None, columns, rows, fixed=columns[:6])


def _flat(details: Mapping[str, Any]) -> str:
    """Audit details on one line: the totals, then the parameters; never the batches."""
    parts = []
    for key, value in details.items():
        if key in ("batches", "original_body", "edited_body") or value in (None, [], {}):
            continue
        if isinstance(value, Mapping):
            inner = _flat(value)
            if inner:
                parts.append(f"{key}: {inner};" if key in ("totals", "parameters") else inner)
        elif key == "run":
            parts.append(f"run={str(value)[:8]}")
        elif key == "rows" and isinstance(value, list):  # a discard's events: count only
            parts.append(f"rows={len(value)}")
        elif not key.endswith("_before") and key != "finished_at":
            parts.append(f"{key}={json.dumps(value) if isinstance(value, list) else value}")
    return " ".join(part for part in parts if part).rstrip(";")
