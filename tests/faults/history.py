"""A delivery-history checker for the fault scenarios, in the spirit of Jepsen's queue checker.

Pure data in, report out. A scenario records what its producers *know* (which outbox
transactions committed, which rolled back, which ended with an unknown outcome) and, after
the faults heal and the backlog drains, reads each consumer's effect table (one row per
handler commit, in commit order) and its dead letters. ``check_history`` compares the two
against DESIGN.md's invariants and returns a frozen report to assert on and print::

    report = check_history(committed, rolled_back, consumers, indeterminate=unknown)
    print(report.table())
    assert report.ok, report.table()

Message ids may be ``str``, ``UUID`` or ``int``; they are compared by ``str()`` so ids read
back from a database as ``UUID`` match ids recorded as strings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple, TypeVar, Union
from uuid import UUID

__all__ = [
    "Committed",
    "ConsumerHistory",
    "ConsumerReport",
    "Effect",
    "HistoryReport",
    "IdMapping",
    "MessageId",
    "check_history",
]

MessageId = str | UUID | int
_V = TypeVar("_V")
IdMapping = Union[Mapping[str, _V], Mapping[UUID, _V], Mapping[int, _V]]  # noqa: UP007
"""A mapping keyed by message ids of one type (``Mapping`` keys are invariant)."""


class Committed(NamedTuple):
    """What the producer committed for one message: a plain ``(key, seq, poison)`` works."""

    key: str | None
    """Ordering key, or None for an unkeyed message."""
    seq: int
    """Position within its key, increasing in commit order (any int for unkeyed ones)."""
    poison: bool = False
    """The handler always rejects it: it must end as a dead letter, never as an effect."""


class Effect(NamedTuple):
    """One effect-table row (one handler commit): a plain ``(id, key, seq)`` row works."""

    message_id: MessageId
    key: str | None
    seq: int


@dataclass(frozen=True)
class ConsumerHistory:
    """What one consumer did, as read back after the run."""

    name: str
    effects: Sequence[Effect | tuple[MessageId, str | None, int]]
    """Effect rows in apply (commit) order."""
    dead_letters: Iterable[MessageId] = ()
    """Dead-lettered message ids, one per dead-letter row (duplicates are anomalies)."""
    ordered: bool = False
    """The consumer asked for per-key order: check it."""
    deliveries: IdMapping[int] | None = None
    """Deliveries observed per message id (e.g. ``Counter(ids)``), if the scenario counted."""
    expected: Iterable[MessageId] | None = None
    """Committed messages this consumer subscribes to; None means all of them."""


_EXAMPLES: Final = 5
_ANOMALIES: Final = (
    "lost",
    "phantom",
    "applied_twice",
    "dead_twice",
    "unexpected_dead",
    "poison_missed",
    "applied_and_dead",
    "mismatched",
    "misrouted",
    "order_violations",
)
_COUNTS: Final = ("expected", "applied", "dead", *_ANOMALIES)


@dataclass(frozen=True)
class ConsumerReport:
    """Counts for one consumer (or the total). Every anomaly field must be 0 for ``ok``."""

    name: str
    ordered: bool
    expected: int
    """Committed messages this consumer should have processed or dead-lettered."""
    applied: int
    """Distinct messages with at least one effect row."""
    dead: int
    """Distinct dead-lettered messages."""
    lost: int
    """Expected, yet neither applied nor dead-lettered (no-loss invariant)."""
    phantom: int
    """Applied or dead-lettered, yet rolled back or never committed (no-phantom invariant)."""
    applied_twice: int
    """Messages with more than one effect row (effect-once invariant)."""
    delivered_twice: int | None
    """Messages delivered more than once: allowed, informative; None if not counted."""
    dead_twice: int
    """Messages with more than one dead-letter row."""
    unexpected_dead: int
    """Dead-lettered though not poison."""
    poison_missed: int
    """Poison messages not dead-lettered, applied or lost (bounded-retries invariant)."""
    applied_and_dead: int
    """Messages both applied and dead-lettered: an outcome must be one or the other."""
    mismatched: int
    """Effect rows whose (key, seq) differ from what was committed under that id."""
    misrouted: int
    """Committed messages this consumer applied or dead-lettered but does not subscribe to."""
    order_violations: int
    """Ordered consumers only: effects with a seq lower than an earlier effect of its key."""
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """A few offending ids (or descriptions) per non-zero anomaly, for the failure message."""

    @property
    def ok(self) -> bool:
        """No invariant is violated (``delivered_twice`` is allowed)."""
        return all(getattr(self, name) == 0 for name in _ANOMALIES)


@dataclass(frozen=True)
class HistoryReport:
    """The checker's verdict: one report per consumer plus totals."""

    committed: int
    """Messages known committed, including indeterminate ones some consumer saw."""
    rolled_back: int
    indeterminate: int
    """Messages whose commit outcome the producer could not know."""
    indeterminate_committed: int
    """Of those, how many some consumer saw (so they did commit, and count as committed)."""
    consumers: tuple[ConsumerReport, ...]

    @property
    def ok(self) -> bool:
        """Every consumer is ok."""
        return all(c.ok for c in self.consumers)

    @property
    def total(self) -> ConsumerReport:
        """Counts summed over consumers; examples are prefixed with the consumer's name."""
        sums = {name: sum(getattr(c, name) for c in self.consumers) for name in _COUNTS}
        counted = [c.delivered_twice for c in self.consumers if c.delivered_twice is not None]
        examples: dict[str, tuple[str, ...]] = {}
        for c in self.consumers:
            for kind, ids in c.examples.items():
                merged = examples.get(kind, ()) + tuple(f"{c.name}:{i}" for i in ids)
                examples[kind] = merged[:_EXAMPLES]
        return ConsumerReport(
            name="TOTAL",
            ordered=any(c.ordered for c in self.consumers),
            delivered_twice=sum(counted) if counted else None,
            examples=examples,
            **sums,
        )

    def consumer(self, name: str) -> ConsumerReport:
        """The report of the consumer called ``name``."""
        for c in self.consumers:
            if c.name == name:
                return c
        raise KeyError(name)

    def table(self, examples: bool = True) -> str:
        """A fixed-width text table, one row per consumer plus TOTAL, then example ids."""
        columns: list[tuple[str, str]] = [
            ("consumer", "name"),
            ("ord", "ordered"),
            ("expect", "expected"),
            ("applied", "applied"),
            ("dead", "dead"),
            ("lost", "lost"),
            ("phantom", "phantom"),
            ("applied2x", "applied_twice"),
            ("deliv2x", "delivered_twice"),
            ("dead2x", "dead_twice"),
            ("bad_dead", "unexpected_dead"),
            ("poison_miss", "poison_missed"),
            ("appl+dead", "applied_and_dead"),
            ("mismatch", "mismatched"),
            ("misroute", "misrouted"),
            ("order", "order_violations"),
            ("ok", "ok"),
        ]
        reports = [*self.consumers, self.total]

        def cell(report: ConsumerReport, attr: str) -> str:
            value = getattr(report, attr)
            if attr == "ok":
                return "ok" if value else "FAIL"
            if attr == "ordered":
                return "yes" if value else "-"
            return "-" if value is None else str(value)

        rows = [[head for head, _ in columns]]
        rows += [[cell(r, attr) for _, attr in columns] for r in reports]
        widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]

        def line(row: list[str]) -> str:
            first = row[0].ljust(widths[0])
            rest = (value.rjust(width) for value, width in zip(row[1:], widths[1:], strict=True))
            return " ".join([first, *rest]).rstrip()

        out = [
            f"history: committed={self.committed} rolled_back={self.rolled_back} "
            f"indeterminate={self.indeterminate} "
            f"(seen, so committed: {self.indeterminate_committed}) "
            f"-> {'OK' if self.ok else 'ANOMALIES'}",
            line(rows[0]),
            line(["-" * w for w in widths]),
            *(line(row) for row in rows[1:-1]),
            line(["-" * w for w in widths]),
            line(rows[-1]),
        ]
        if examples:
            for c in self.consumers:
                for kind, ids in c.examples.items():
                    out.append(f"  {c.name} {kind}: {', '.join(ids)}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _ids(values: Iterable[MessageId]) -> list[str]:
    return [str(v) for v in values]


def _sample(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(values)[:_EXAMPLES])


def check_history(
    committed: IdMapping[Committed | tuple[str | None, int, bool]],
    rolled_back: Iterable[MessageId],
    consumers: Iterable[ConsumerHistory],
    *,
    indeterminate: IdMapping[Committed | tuple[str | None, int, bool]] | None = None,
) -> HistoryReport:
    """Check every consumer's history against what the producers committed.

    ``indeterminate`` holds messages whose commit outcome is unknown (e.g. the connection
    died during COMMIT): one seen by any consumer did commit and is then held to the same
    rules as ``committed`` for every consumer; one seen by none is ignored. Raises
    ``ValueError`` on contradictory input (an id both committed and rolled back, two
    consumers with one name), which is a bug in the scenario rather than in the system.
    """
    known = {str(k): Committed(*v) for k, v in committed.items()}
    rolled = set(_ids(rolled_back))
    unsure = {str(k): Committed(*v) for k, v in (indeterminate or {}).items()}
    histories = list(consumers)
    if clash := (known.keys() & rolled) | (known.keys() & unsure.keys()) | (rolled & unsure.keys()):
        raise ValueError(f"ids in more than one of committed/rolled_back/indeterminate: {clash}")
    names = Counter(h.name for h in histories)
    if dupes := [n for n, c in names.items() if c > 1]:
        raise ValueError(f"duplicate consumer names: {dupes}")

    seen: set[str] = set()
    for h in histories:
        seen.update(str(e[0]) for e in h.effects)
        seen.update(_ids(h.dead_letters))
    resolved = {k: v for k, v in unsure.items() if k in seen}
    all_committed = known | resolved

    return HistoryReport(
        committed=len(all_committed),
        rolled_back=len(rolled),
        indeterminate=len(unsure),
        indeterminate_committed=len(resolved),
        consumers=tuple(_check_consumer(h, all_committed) for h in histories),
    )


def _check_consumer(h: ConsumerHistory, committed: Mapping[str, Committed]) -> ConsumerReport:
    effects = [Effect(str(e[0]), e[1], e[2]) for e in h.effects]
    applied = Counter(str(e.message_id) for e in effects)
    dead = Counter(_ids(h.dead_letters))
    subscribed = committed.keys() if h.expected is None else set(_ids(h.expected))
    expected = subscribed & committed.keys()
    observed = applied.keys() | dead.keys()
    poison = {m for m in expected if committed[m].poison}
    examples: dict[str, tuple[str, ...]] = {}

    def count(kind: str, offenders: Collection[str]) -> int:
        if offenders:
            examples[kind] = _sample(offenders)
        return len(offenders)

    mismatched = [
        f"{e.message_id} got ({e.key},{e.seq})"
        for e in effects
        if (c := committed.get(str(e.message_id))) is not None and (e.key, e.seq) != c[:2]
    ]
    violations: list[str] = []
    if h.ordered:
        highest: dict[str, tuple[int, str]] = {}
        for e in effects:
            if e.key is None:
                continue
            top = highest.get(e.key)
            if top is not None and e.seq < top[0]:
                violations.append(f"{e.key}: seq {e.seq} ({e.message_id}) after {top[0]}")
            else:
                highest[e.key] = (e.seq, str(e.message_id))
    delivered_twice = None
    if h.deliveries is not None:
        delivered_twice = sum(1 for n in h.deliveries.values() if n > 1)

    return ConsumerReport(
        name=h.name,
        ordered=h.ordered,
        expected=len(expected),
        applied=len(applied),
        dead=len(dead),
        lost=count("lost", expected - observed),
        phantom=count("phantom", observed - committed.keys()),
        applied_twice=count("applied_twice", [m for m, n in applied.items() if n > 1]),
        delivered_twice=delivered_twice,
        dead_twice=count("dead_twice", [m for m, n in dead.items() if n > 1]),
        unexpected_dead=count("unexpected_dead", (dead.keys() & expected) - poison),
        poison_missed=count("poison_missed", poison - dead.keys()),
        applied_and_dead=count("applied_and_dead", applied.keys() & dead.keys()),
        mismatched=count("mismatched", mismatched),
        misrouted=count("misrouted", (observed & committed.keys()) - expected),
        order_violations=count("order_violations", violations),
        examples=examples,
    )
