"""``postroom dead-letters purge | unpurge``: give up on dead letters, or change your mind.

A purge always asks for ``--yes`` (or ``--dry-run``), showing what it would purge first;
an un-purge restores purged dead letters within their retention.
"""

from __future__ import annotations

from postroom.cli_filters import (
    All,
    Consumer,
    ErrorType,
    Ids,
    Limit,
    MessageId,
    Reason,
    RouterSpec,
    Since,
    Text,
    Topic,
    Until,
    parse,
    router_of,
    selection,
)
from postroom.cli_ops import Actor, DryRun, Json, actor_or_user
from postroom.cli_runs import Yes, changed, progress_bar


def purge(
    ids: Ids = None,
    consumer: Consumer = None,
    topic: Topic = None,
    error_type: ErrorType = None,
    text: Text = None,
    reason: Reason = None,
    since: Since = None,
    until: Until = None,
    message_id: MessageId = None,
    every: All = False,
    dry_run: DryRun = False,
    yes: Yes = False,
    limit: Limit = None,
    router: RouterSpec = None,
    actor: Actor = None,
    as_json: Json = False,
) -> None:
    """Give up on dead letters: mark them purged (restorable until pruned; audited)."""
    from postroom.purge import purge as run_purge

    filters = selection(
        ids,
        every,
        parse(
            consumer=consumer,
            topic=topic,
            error_type=error_type,
            text=text,
            reason=reason,
            since=since,
            until=until,
            message_id=message_id,
        ),
    )
    loaded = router_of(router)
    bar, progress = progress_bar("checking" if dry_run else "purging")
    with bar:
        changed(
            lambda s, e: run_purge(
                e,
                s.schema_name,
                filters,
                actor=actor_or_user(actor),
                confirm=yes,
                dry_run=dry_run,
                limit=limit,
                progress=progress,
                router=loaded,
            ),
            filters,
            "purge",
            as_json,
        )


def unpurge(
    ids: Ids = None,
    consumer: Consumer = None,
    topic: Topic = None,
    error_type: ErrorType = None,
    text: Text = None,
    reason: Reason = None,
    since: Since = None,
    until: Until = None,
    message_id: MessageId = None,
    every: All = False,
    dry_run: DryRun = False,
    limit: Limit = None,
    router: RouterSpec = None,
    actor: Actor = None,
    as_json: Json = False,
) -> None:
    """Restore purged dead letters to dead, within their retention (audited)."""
    from datetime import timedelta

    from postroom.purge import unpurge as run_unpurge

    filters = selection(
        ids,
        every,
        parse(
            consumer=consumer,
            topic=topic,
            error_type=error_type,
            text=text,
            reason=reason,
            since=since,
            until=until,
            message_id=message_id,
        ),
    )
    loaded = router_of(router)
    bar, progress = progress_bar("checking" if dry_run else "restoring")
    with bar:
        changed(
            lambda s, e: run_unpurge(
                e,
                s.schema_name,
                filters,
                actor=actor_or_user(actor),
                retention=timedelta(days=s.dead_letter_retention_days),
                dry_run=dry_run,
                limit=limit,
                progress=progress,
                router=loaded,
            ),
            filters,
            "unpurge",
            as_json,
        )
