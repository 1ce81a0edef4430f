"""The printing every changing ``postroom dead-letters`` command shares: progress, summary, report.

Each prints, for a dry run as for a real one, a summary by consumer, error type and
verdict, so a glance shows that no other consumer was touched; then the rows that need a
person (refused, loop guard, skipped). A run that needs a confirmation shows that summary
and exits 2 asking for ``--yes``; one that matched nothing says where the selection is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from postroom.cli_ops import fail, print_json, print_table, run

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from postroom.filters import Filters
    from postroom.runs import Report
    from postroom.settings import Settings

SHOWN = 50
"""Rows of a report shown to people; --json has them all."""

Yes = Annotated[bool, typer.Option("--yes", "-y", help="Confirm: really do it.")]


def progress_bar(label: str) -> tuple[Any, Callable[[int, int], None]]:
    """Return a progress bar on stderr (shown on a terminal only) and its update callback."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    bar = Progress(console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def summary(report: Report) -> None:
    """Print the count of dead letters per consumer, error type and verdict."""
    title = "dry run: nothing changed" if report.dry_run else None
    rows = [
        (n, consumer, error or "-", verdict) for consumer, error, verdict, n in report.breakdown()
    ]
    print_table(title, ("count", "consumer", "error type", "verdict"), rows, fixed=("count",))


def changed(
    work: Callable[[Settings, AsyncEngine], Any], filters: Filters, what: str, as_json: bool
) -> Report:
    """Run *work*; on a needed confirmation show the preview and exit 2 asking for --yes."""
    from postroom.lookup import elsewhere
    from postroom.runs import ConfirmationNeededError

    async def guarded(settings: Settings, engine: AsyncEngine) -> Any:
        try:
            report = await work(settings, engine)
        except ConfirmationNeededError as exc:
            return exc
        where = await elsewhere(engine, settings.schema_name, filters) if not report.items else {}
        return report, where

    outcome = run(guarded)
    if isinstance(outcome, ConfirmationNeededError):
        preview = outcome.preview
        if as_json:
            print_json(preview.as_json())
        else:
            summary(preview)
        counts = ", ".join(f"{n} {label}" for label, n in preview.counts().items())
        fail(
            f"{what} needs --yes: it selects {outcome.letters} "
            f"({outcome.why}): {counts}. Check the summary, "
            "then run it again with --yes (or --dry-run to list every row)"
        )
    report: Report = outcome[0]
    _report(report, outcome[1], as_json)
    return report


def _report(report: Report, where: dict[str, int], as_json: bool) -> None:
    from postroom.audit import Action
    from postroom.runs import DONE, Verdict

    if as_json:
        print_json(report.as_json())
    elif report.items:
        summary(report)
        # What was not acted on is listed: that is what needs a person.
        needing = [i for i in report.items if i.verdict not in DONE]
        if needing:
            rows = [
                (i.id, i.consumer, i.message_id, report.label(i.verdict), i.detail) for i in needing
            ]
            print_table(
                "not acted on",
                ("id", "consumer", "message id", "verdict", "detail"),
                rows[:SHOWN],
                fixed=("id", "message id", "verdict"),
            )
            if len(rows) > SHOWN:
                typer.echo(f"... and {len(rows) - SHOWN} more (see --json)")
        typer.echo(", ".join(f"{n} {label}" for label, n in report.counts().items()))
        if not report.dry_run and report.ids(Verdict.REPLAYED):
            typer.echo(
                f"run {report.run}: see what became of them with "
                f"`postroom dead-letters status --run {report.run[:8]}`"
            )
    if not report.items:
        if where:
            found = ", ".join(f"{n} {status}" for status, n in where.items())
            wanted = "purged" if report.action is Action.UNPURGE else "dead"
            typer.echo(
                f"no dead letter matched among the {wanted} ones; the same selection has "
                f"{found} (see `dead-letters list --status all` with the same filters)",
                err=True,
            )
        else:
            typer.echo("no dead letter matched, in any status", err=True)
    if not report.complete:
        raise typer.Exit(1)
