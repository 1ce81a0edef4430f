"""``postroom dead-letters replay | edit | status``: send dead letters back, see how it went.

A replay over more than ``--threshold`` dead letters, or ``--all``, first shows its
summary and asks for ``--yes``; ``edit`` replays one dead letter with a corrected body;
``status --run`` tells, for each message a replay sent, whether it was handled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from postroom.cli_filters import Limit, RouterSpec, router_of, selecting
from postroom.cli_ops import (
    Actor,
    DryRun,
    Json,
    actor_or_user,
    fail,
    print_json,
    print_table,
    run,
    when,
)
from postroom.cli_runs import SHOWN, Yes, changed, progress_bar
from postroom.filters import Filters


@selecting()
def replay(
    filters: Filters,
    dry_run: DryRun = False,
    yes: Yes = False,
    threshold: Annotated[
        int, typer.Option(min=0, help="Ask for --yes when more would be replayed.")
    ] = 100,
    limit: Limit = None,
    rate: Annotated[
        float | None, typer.Option(min=0.1, help="At most this many per second.")
    ] = None,
    max_replays: Annotated[
        int, typer.Option(min=1, help="Loop guard: flag, don't replay, after this many replays.")
    ] = 3,
    force: Annotated[bool, typer.Option("--force", help="Replay past the loop guard.")] = False,
    router: RouterSpec = None,
    actor: Actor = None,
    as_json: Json = False,
) -> None:
    """Send dead letters back to the consumer that failed them, and to no other.

    Interrupted? Run the same command again: it carries on where it stopped.
    """
    from postroom.outbox import Outbox
    from postroom.replay import replay as run_replay

    loaded = router_of(router)
    bar, progress = progress_bar("checking" if dry_run else "replaying")
    with bar:
        changed(
            lambda s, e: run_replay(
                e,
                s.schema_name,
                filters,
                outbox=Outbox.from_settings(s),
                actor=actor_or_user(actor),
                dry_run=dry_run,
                confirm=yes,
                threshold=threshold,
                limit=limit,
                rate=rate,
                max_replays=max_replays,
                force=force,
                progress=progress,
                router=loaded,
            ),
            filters,
            "replay",
            as_json,
        )


def edit(
    letter_id: Annotated[int, typer.Argument(metavar="ID", help="Dead-letter id.")],
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="The corrected body (JSON); default: open $EDITOR."),
    ] = None,
    router: RouterSpec = None,
    dry_run: DryRun = False,
    actor: Actor = None,
    as_json: Json = False,
) -> None:
    """Replay one dead letter with a corrected body; the original stays in the audit trail.

    With --router the body is checked against the consumer's event model first.
    """
    from postroom.filters import Filters
    from postroom.lookup import get_letter
    from postroom.outbox import Outbox
    from postroom.replay import replay_edited

    loaded = router_of(router)
    if file is not None:
        try:
            edited = file.read_bytes()
        except OSError as exc:
            fail(f"cannot read --file {file}: {exc.strerror}")
    else:
        detail = run(lambda s, e: get_letter(e, s.schema_name, letter_id, router=loaded))
        edited = _edit_in_editor(detail.body)
    try:
        document = json.loads(edited)
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"the edited body is not JSON: {exc}")
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    changed(
        lambda s, e: replay_edited(
            e,
            s.schema_name,
            letter_id,
            body,
            outbox=Outbox.from_settings(s),
            actor=actor_or_user(actor),
            router=loaded,
            dry_run=dry_run,
        ),
        Filters(ids=(letter_id,)),
        "edit",
        as_json,
    )


def _edit_in_editor(body: bytes) -> bytes:
    import os
    import shlex
    import subprocess
    import tempfile

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not editor:
        fail("set $EDITOR (or $VISUAL) to edit the body, or give the corrected body with --file")
    try:
        shown = json.dumps(json.loads(body), indent=2, ensure_ascii=False) + "\n"
    except (ValueError, UnicodeDecodeError):
        shown = body.decode("utf-8", "replace")
    with tempfile.TemporaryDirectory(prefix="postroom-edit-") as folder:
        path = Path(folder) / "body.json"
        path.write_text(shown, encoding="utf-8")
        done = subprocess.run([*shlex.split(editor), str(path)], check=False)
        if done.returncode != 0:
            fail(f"the editor exited with {done.returncode}: nothing replayed")
        edited = path.read_text(encoding="utf-8")
    if edited == shown:
        fail("the body was not changed: nothing replayed (use `replay ID` to replay it as is)", 1)
    return edited.encode()


def status(
    run_id: Annotated[
        str, typer.Option("--run", help="A replay's run id (its first 8 characters will do).")
    ],
    as_json: Json = False,
) -> None:
    """Show what became of each message a replay sent: handled, failed again, pending.

    Exits 0 once every one was handled, 1 while some failed again or are pending.
    """
    from postroom.fates import Fate, fates

    found = run(lambda s, e: fates(e, s.schema_name, run_id))
    if as_json:
        print_json(found.as_json())
    else:
        order = {Fate.FAILED_AGAIN: 0, Fate.PENDING: 1, Fate.HANDLED: 2}
        rows = [
            (f.id, f.consumer, f.message_id, f.fate.value, f.new_id or "", f.detail)
            for f in sorted(found.fates, key=lambda f: (order[f.fate], f.id))
        ]
        title = f"run {found.run} ({found.action} by {found.actor}, {when(found.at)} UTC)"
        print_table(
            title,
            ("id", "consumer", "message id", "fate", "new dead letter", "detail"),
            rows[:SHOWN],
            fixed=("id", "message id", "fate", "new dead letter"),
        )
        if len(rows) > SHOWN:
            typer.echo(f"... and {len(rows) - SHOWN} more (see --json)")
        typer.echo(", ".join(f"{n} {fate}" for fate, n in found.counts().items()) or "nothing")
    if set(found.counts()) != {Fate.HANDLED.value}:
        raise typer.Exit(1)
