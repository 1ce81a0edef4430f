"""``postroom dead-letters purge | unpurge``: give up on dead letters, or change your mind.

A purge always asks for ``--yes`` (or ``--dry-run``), showing what it would purge first;
an un-purge restores purged dead letters within their retention.
"""

from __future__ import annotations

from postroom.cli_filters import Limit, RouterSpec, router_of, selecting
from postroom.cli_ops import Actor, DryRun, Json, actor_or_user
from postroom.cli_runs import Yes, changed, progress_bar
from postroom.filters import Filters


@selecting()
def purge(
    filters: Filters,
    dry_run: DryRun = False,
    yes: Yes = False,
    limit: Limit = None,
    router: RouterSpec = None,
    actor: Actor = None,
    as_json: Json = False,
) -> None:
    """Give up on dead letters: mark them purged (restorable until pruned; audited)."""
    from postroom.purge import purge as run_purge

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


@selecting()
def unpurge(
    filters: Filters,
    dry_run: DryRun = False,
    limit: Limit = None,
    router: RouterSpec = None,
    actor: Actor = None,
    as_json: Json = False,
) -> None:
    """Restore purged dead letters to dead, within their retention (audited)."""
    from datetime import timedelta

    from postroom.purge import unpurge as run_unpurge

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
