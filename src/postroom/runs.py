"""Runs: one replay, purge or un-purge command over a selection, in batches, as one report.

A run selects the ids first (oldest first), then works in small batches, each one
transaction: the batch's rows are locked if they are still in the status the run acts
on, acted on, and added to the run's one audit row. A killed run loses nothing and
applies nothing twice: a batch commits whole or not at all, and what committed is no
longer in that status, so the same command run again carries on where the last stopped.
A dry run reads the same rows without locking and changes nothing.

A run over more than a threshold of dead letters, or over all of them, needs a
confirmation: without one it raises :class:`ConfirmationNeededError` carrying the
preview (the dry run's report), so a person sees exactly what would happen first.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy import Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from postroom import audit
from postroom.audit import Action
from postroom.deadletters import DeadStatus
from postroom.errors import InvalidFilterError, PostroomError
from postroom.filters import Filters, check_ids, check_names
from postroom.tables import dead_letters, schema_map

if TYPE_CHECKING:
    from postroom.router import Router

Progress = Callable[[int, int], None]
"""Called with (dead letters handled so far, dead letters selected) after each batch."""

DEFAULT_THRESHOLD = 100
"""A run over more dead letters than this needs a confirmation."""


class Verdict(enum.StrEnum):
    """What became of one selected dead letter (in a dry run: what would)."""

    REPLAYED = "replayed"
    """Sent back to its consumer's queue."""
    PURGED = "purged"
    """Marked purged; kept until the retention period ends."""
    RESTORED = "restored"
    """Un-purged: back to ``dead``, waiting for a person again."""
    REFUSED = "refused"
    """Cannot be acted on: not rebuildable into a message, over the size limit, redacted,
    or (un-purge) its message is dead again under a newer dead letter."""
    LOOP_GUARD = "loop_guard"
    """Already replayed the allowed number of times and failed again; needs ``force``."""
    SKIPPED = "skipped"
    """Named by id but not acted on: not in the status acted on, or outside the filters."""


DONE = (Verdict.REPLAYED, Verdict.PURGED, Verdict.RESTORED)
_WOULD = {
    Verdict.REPLAYED: "would replay",
    Verdict.PURGED: "would purge",
    Verdict.RESTORED: "would restore",
}


@dataclass(frozen=True, slots=True)
class Item:
    """One dead letter's verdict and why."""

    id: int
    consumer: str
    message_id: str
    verdict: Verdict
    detail: str = ""
    error_type: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    """The result of a run; ``run`` names its audit row (``postroom audit --run``)."""

    action: Action
    dry_run: bool
    run: str
    items: tuple[Item, ...]

    def ids(self, verdict: Verdict) -> list[int]:
        return [item.id for item in self.items if item.verdict is verdict]

    def label(self, verdict: Verdict) -> str:
        """The verdict as people read it: a dry run says what *would* happen."""
        return _WOULD.get(verdict, verdict.value) if self.dry_run else verdict.value

    @property
    def complete(self) -> bool:
        """True if something was selected and every selected dead letter was acted on."""
        return bool(self.items) and all(item.verdict in DONE for item in self.items)

    def counts(self) -> dict[str, int]:
        """How many dead letters got each verdict, labelled as :meth:`label` says."""
        counted = Counter(item.verdict for item in self.items)
        return {self.label(v): counted[v] for v in Verdict if counted[v]}

    def key(self, verdict: Verdict) -> str:
        """The verdict in JSON: :meth:`label` with underscores (``would_replay``)."""
        return self.label(verdict).replace(" ", "_")

    def breakdown(self) -> list[tuple[str, str, str, int]]:
        """(consumer, error type, verdict label, count), the largest first.

        The summary that shows a run touched exactly the consumers it meant to.
        """
        counted = Counter((i.consumer, i.error_type, self.label(i.verdict)) for i in self.items)
        return [(*key, n) for key, n in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))]

    def as_json(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "dry_run": self.dry_run,
            "run": self.run,
            "counts": {k.replace(" ", "_"): n for k, n in self.counts().items()},
            "breakdown": [
                {"consumer": c, "error_type": e, "verdict": v.replace(" ", "_"), "count": n}
                for c, e, v, n in self.breakdown()
            ],
            "items": [
                {
                    "id": i.id,
                    "consumer": i.consumer,
                    "message_id": i.message_id,
                    "error_type": i.error_type,
                    "verdict": self.key(i.verdict),
                    "detail": i.detail,
                }
                for i in self.items
            ],
        }


class ConfirmationNeededError(PostroomError):
    """A run needs a confirmation (``confirm=True``, ``--yes``); nothing was changed.

    ``preview`` is the dry run's report: exactly what the confirmed run would do.
    """

    def __init__(self, what: str, preview: Report, why: str) -> None:
        selected = len(preview.items)
        letters = f"{selected} dead letter{'' if selected == 1 else 's'}"
        super().__init__(f"{what} needs confirmation: it selects {letters} ({why})")
        self.preview = preview
        self.selected = selected
        self.why = why
        self.letters = letters


Act = Callable[[AsyncSession, list[Row[Any]]], Awaitable[list[tuple[Item, Any]]]]
"""Decide each locked row's verdict; return (item, payload) pairs, payload None if not acted."""
Apply = Callable[[AsyncSession, list[tuple[Row[Any], Any]]], Awaitable[None]]
"""Make the change for the acted-on rows, in the batch's transaction (not in a dry run)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run acts on and how; built by replay, purge and un-purge."""

    action: Action
    status: DeadStatus
    """The status a dead letter must be in to be acted on."""
    judge: Act
    apply: Apply
    parameters: dict[str, Any]


async def ask_first(
    engine: AsyncEngine,
    schema: str,
    filters: Filters,
    plan: Plan,
    *,
    why: str,
    actor: str,
    limit: int | None,
    router: Router | None,
) -> NoReturn:
    """Refuse to run *plan* unconfirmed: raise ConfirmationNeededError with its dry run.

    The preview is the very run a ``--dry-run`` makes, so what a person confirms is what
    the confirmed command then does.
    """
    preview = await execute(
        engine,
        schema,
        filters,
        plan,
        run="preview",
        actor=actor,
        dry_run=True,
        limit=limit,
        batch_size=1000,
        router=router,
    )
    raise ConfirmationNeededError(plan.action.value.split(".")[-1], preview, why)


async def execute(
    engine: AsyncEngine,
    schema: str,
    filters: Filters,
    plan: Plan,
    *,
    run: str,
    actor: str,
    dry_run: bool,
    limit: int | None,
    batch_size: int,
    rate: float | None = None,
    progress: Progress | None = None,
    router: Router | None = None,
) -> Report:
    """Run *plan* over the dead letters *filters* select, batch by batch, audited as one."""
    if filters.status not in (None, plan.status):
        raise InvalidFilterError(
            f"{plan.action.value.split('.')[-1]} acts on {plan.status.value} dead letters only; "
            f"drop --status {filters.status}"
        )
    ids, items = await select_ids(engine, schema, filters, plan.status, limit, router=router)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    translate = {"schema_translate_map": schema_map(schema)}
    size = batch_size if rate is None else max(1, min(batch_size, int(rate)))
    pace = _Pace(rate)
    done = 0
    changed = False
    for chunk in _chunks(ids, size):
        await pace.wait(done)
        async with sessions() as session:  # closing without commit rolls back
            query = (
                select(dead_letters)
                .where(dead_letters.c.id.in_(chunk), dead_letters.c.status == plan.status.value)
                .order_by(dead_letters.c.id)
            )
            if not dry_run:
                query = query.with_for_update()
            rows = list((await session.execute(query, execution_options=translate)).all())
            judged = await plan.judge(session, rows)
            acted = [
                (row, payload)
                for row, (_, payload) in zip(rows, judged, strict=True)
                if payload is not None
            ]
            if acted and not dry_run:
                await plan.apply(session, acted)
                await audit.add_batch(
                    session,
                    schema=schema,
                    run=run,
                    actor=actor,
                    action=plan.action,
                    target_ids=[row.id for row, _ in acted],
                    parameters=plan.parameters,
                )
                await session.commit()
                changed = True
        items.extend(item for item, _ in judged)
        items.extend(_vanished(chunk, rows))
        done += len(chunk)
        if progress:
            progress(done, len(ids))
    report = Report(plan.action, dry_run, run, tuple(sorted(items, key=lambda i: i.id)))
    if changed:
        totals = {v.value: len(report.ids(v)) for v in Verdict if report.ids(v)}
        await audit.finish(engine, schema, run, {"selected": len(report.items), **totals})
    return report


def needs_confirmation(filters: Filters, selected: int, threshold: int) -> str | None:
    """Why a run over *selected* dead letters needs a confirmation, or None if it does not."""
    if not filters.narrows:
        return "every dead letter is selected"
    if selected > threshold:
        return f"more than {threshold}"
    return None


async def select_ids(
    engine: AsyncEngine,
    schema: str,
    filters: Filters,
    status: DeadStatus,
    limit: int | None,
    *,
    router: Router | None = None,
) -> tuple[list[int], list[Item]]:
    """Return the ids to act on (oldest first) and the named ids that will not be."""
    live = replace(filters, status=status)
    c = dead_letters.c
    query = select(c.id).where(*live.clauses()).order_by(c.id)
    if limit is not None:
        query = query.limit(limit)
    translate = {"schema_translate_map": schema_map(schema)}
    async with engine.connect() as connection:
        await check_ids(connection, schema, filters.ids)
        ids = list((await connection.execute(query, execution_options=translate)).scalars())
        if not ids:  # a name that matched something is known: check only when empty
            await check_names(connection, schema, filters, router=router)
        chosen = set(ids)
        left = [i for i in filters.ids if i not in chosen]
        others = select(c.id, c.consumer, c.message_id, c.error_type, c.status).where(
            c.id.in_(left)
        )
        rows = (await connection.execute(others, execution_options=translate)).all()
    skipped = [
        Item(
            row.id,
            row.consumer,
            row.message_id,
            Verdict.SKIPPED,
            f"already {row.status}" if row.status != status else "outside the filters or the limit",
            row.error_type,
        )
        for row in rows
    ]
    return ids, skipped


async def mark(session: AsyncSession, ids: Sequence[int], status: DeadStatus, schema: str) -> None:
    """Set the status of dead letters *ids* (a replay also counts it in ``replays``)."""
    values: dict[str, Any] = {"status": status.value, "updated_at": func.now()}
    if status is DeadStatus.REPLAYED:
        values["replays"] = dead_letters.c.replays + 1
    statement = update(dead_letters).where(dead_letters.c.id.in_(ids)).values(values)
    await session.execute(statement, execution_options={"schema_translate_map": schema_map(schema)})


def item_of(row: Any, verdict: Verdict, detail: str = "") -> Item:
    return Item(row.id, row.consumer, row.message_id, verdict, detail, row.error_type)


def _vanished(chunk: Sequence[int], rows: Sequence[Row[Any]]) -> Iterable[Item]:
    """Selected ids that were resolved by someone else before their batch ran."""
    found = {row.id for row in rows}
    for letter_id in chunk:
        if letter_id not in found:
            yield Item(letter_id, "", "", Verdict.SKIPPED, "resolved by another run meanwhile")


def _chunks(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    iterator = iter(ids)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class _Pace:
    """Keep a long run at or under *rate* dead letters per second (None: no bound)."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._start: float | None = None

    async def wait(self, done: int) -> None:
        if not self._rate:
            return
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        delay = self._start + done / self._rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
