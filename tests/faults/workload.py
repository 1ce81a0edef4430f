"""The fault suite's workload: writers, a fleet of real relay/worker processes, a drain.

A scenario (see ``tests/test_faults.py``) wires these together::

    writers commit business rows + outbox events  ──►  postroom relay (N subprocesses)
        (keys, seq per key, rollbacks, poison)              │ RabbitMQ
                                                            ▼
    fault_effects / dead_letters  ◄──  postroom worker tests.apps.faultapp:router (M)

while a fault injector kills, cuts and restarts things. Afterwards the faults heal, the
backlog drains (bounded: the liveness invariant), the fleet stops and the history checker
compares what the writers *know* they committed with what each consumer applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from postroom import Outbox, rabbit
from postroom.broker import Broker
from postroom.settings import Settings
from postroom.tables import qualified
from tests.apps.faultapp import APPLY, AUDIT, DDL, Entry, router
from tests.conftest import ROOT, postroom_cmd, settings_env
from tests.faults.history import Committed, ConsumerHistory, HistoryReport, check_history

APP = "tests.apps.faultapp:router"
CONSUMERS = (APPLY, AUDIT)
ORDERED = {c.name for c in router if c.ordered}


# -- the schema and the topology -------------------------------------------------------------


async def prepare_schema(dsn: str, schema: str) -> None:
    """Create the fault app's tables in *schema* (postroom's own tables already exist)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        for ddl in DDL:
            await conn.execute(ddl.format(schema=schema))
    finally:
        await conn.close()


async def declare_topology(settings: Settings, amqp_url: str | None = None) -> None:
    """Declare the app's queues up front (as the workers will), so no early row is unroutable.

    *amqp_url* (default: the processes' URL) is verified with the processes' CA.
    """
    broker = Broker.parse(amqp_url or settings.amqp_url.get_secret_value(), ca=settings.amqp_tls_ca)
    connection = await rabbit.connect(broker, name="postroom-test")
    try:
        await rabbit.declare_queues(
            connection,
            exchange=settings.exchange,
            dead_letter_exchange=settings.dead_letter_exchange,
            queues=[
                rabbit.QueueSpec(
                    name=c.name,
                    topics=c.topics,
                    delivery_limit=settings.delivery_limit,
                    single_active_consumer=c.ordered,
                )
                for c in router
            ],
        )
    finally:
        await connection.close()


# -- writers ----------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the writers know: committed, rolled back, and commits of unknown outcome."""

    committed: dict[str, Committed] = field(default_factory=dict)
    rolled_back: set[str] = field(default_factory=set)
    indeterminate: dict[str, Committed] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    foreign: dict[str, str] = field(default_factory=dict)
    """Raw messages put on the broker past the outbox (malformed, oversized), by id: each
    must end as a dead letter of every consumer, and as nothing else."""
    foreign_unsure: set[str] = field(default_factory=set)
    """Raw messages whose publish failed: maybe on the broker, maybe not; not checked."""

    @property
    def poison(self) -> set[str]:
        return {m for m, c in self.committed.items() if c.poison}


class _Rollback(Exception):
    """Raised inside a writer's transaction on purpose."""


class Writers:
    """Concurrent writer tasks committing business rows plus outbox events.

    Each transaction takes one ordering key (or none), bumps that key's ``seq`` in
    ``fault_accounts`` (a row lock: writers of one key serialise, so seq order is commit
    order, which is the outbox's id order for that key), inserts 1..3 business rows and
    publishes one :class:`Entry` per row. Some transactions roll back on purpose; some
    entries are poison. A failure before COMMIT is a rollback; a failure during COMMIT is
    an unknown outcome (``indeterminate``).
    """

    def __init__(
        self,
        database_url: str,
        settings: Settings,
        *,
        seed: int,
        writers: int = 4,
        keys: int = 12,
        rollback: float = 0.08,
        unkeyed: float = 0.1,
        poison_every: int = 97,
        max_per_tx: int = 3,
    ) -> None:
        self.ledger = Ledger()
        self._url = database_url
        self._outbox = Outbox.from_settings(settings)
        self._schema = settings.schema_name
        self._rng = random.Random(seed)
        self._writers = writers
        self._keys = [f"k{i:02d}" for i in range(keys)]
        self._rollback = rollback
        self._unkeyed = unkeyed
        self._poison_every = poison_every
        self._max_per_tx = max_per_tx
        self._attempted = 0
        self._unkeyed_seq = 0

    @property
    def keys(self) -> list[str]:
        return self._keys

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def attempted(self) -> int:
        return self._attempted

    async def run(self, total: int, duration: float) -> Ledger:
        """Attempt *total* messages, spread evenly over about *duration* seconds."""
        engine = create_async_engine(
            self._url,
            pool_size=self._writers + 1,
            max_overflow=2,
            pool_pre_ping=True,
            connect_args={"timeout": 5, "command_timeout": 20},
        )
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        loop = asyncio.get_running_loop()
        start = loop.time()
        interval = duration / max(total, 1)

        async def writer() -> None:
            while self._attempted < total:
                due = start + self._attempted * interval
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if self._attempted >= total:
                    return
                try:
                    await self._transaction(sessions, total)
                except Exception as exc:
                    self.ledger.errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.1 + self._rng.random() * 0.2)

        try:
            await asyncio.gather(*(writer() for _ in range(self._writers)))
        finally:
            await engine.dispose()
        return self.ledger

    async def _transaction(self, sessions: async_sessionmaker[AsyncSession], total: int) -> None:
        rng = self._rng
        key = None if rng.random() < self._unkeyed else rng.choice(self._keys)
        count = min(rng.randint(1, self._max_per_tx), total - self._attempted)
        rollback = rng.random() < self._rollback
        self._attempted += count
        await self.commit(sessions, key=key, count=count, rollback=rollback)

    async def commit(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        key: str | None,
        count: int,
        rollback: bool = False,
        sleep: float = 0.0,
        delay: timedelta | None = None,
        hold: float = 0.0,
        skew: tuple[timedelta, timedelta] | None = None,
    ) -> list[str]:
        """Commit one transaction of *count* entries of *key*; note them in the ledger.

        *sleep* makes each entry's handler slow; *delay* holds the rows back; *hold* keeps
        the transaction open that long before COMMIT (its rows hold their ids meanwhile);
        *skew* = (occurred_at shift, available_at shift from the database's now) stands
        for a writer whose clock is off. Returns the message ids (committed or not).
        """
        pending: dict[str, Committed] = {}
        committing = False
        async with sessions() as session:
            try:
                await session.begin()
                for _ in range(count):
                    seq = await self._next_seq(session, key)
                    number = (
                        len(self.ledger.committed) + len(self.ledger.rolled_back) + len(pending)
                    )
                    poison = number % self._poison_every == self._poison_every // 2
                    message = await self._outbox.publish(
                        session,
                        Entry(key=key, seq=seq, poison=poison, sleep=sleep),
                        key=key,
                        delay=delay,
                    )
                    await session.execute(
                        text(
                            f"INSERT INTO {qualified(self._schema, 'fault_entries')} "
                            "(message_id, key, seq, poison) VALUES (:m, :k, :s, :p)"
                        ),
                        {"m": message.message_id, "k": key, "s": seq, "p": poison},
                    )
                    pending[str(message.message_id)] = Committed(key, seq, poison)
                if skew is not None:
                    await session.execute(
                        text(
                            f"UPDATE {qualified(self._schema, 'outbox')} SET "
                            "occurred_at = occurred_at + CAST(:occurred AS interval), "
                            "available_at = now() + CAST(:available AS interval) "
                            "WHERE message_id = ANY(:ids)"
                        ),
                        {
                            "occurred": skew[0],
                            "available": skew[1],
                            "ids": [UUID(m) for m in pending],
                        },
                    )
                if rollback:
                    raise _Rollback
                if hold:
                    await asyncio.sleep(hold)
                committing = True
                await session.commit()
            except BaseException as exc:
                if committing:
                    self.ledger.indeterminate.update(pending)
                else:
                    self.ledger.rolled_back.update(pending)
                    with contextlib.suppress(Exception):
                        await session.rollback()
                if isinstance(exc, _Rollback):
                    return list(pending)
                raise
        self.ledger.committed.update(pending)
        return list(pending)

    async def _next_seq(self, session: AsyncSession, key: str | None) -> int:
        if key is None:
            self._unkeyed_seq += 1
            return self._unkeyed_seq
        result = await session.execute(
            text(
                f"INSERT INTO {qualified(self._schema, 'fault_accounts')} AS a (key, seq) "
                "VALUES (:k, 1) ON CONFLICT (key) DO UPDATE SET seq = a.seq + 1 RETURNING a.seq"
            ),
            {"k": key},
        )
        seq: int = result.scalar_one()
        return seq


# -- the fleet of real processes ---------------------------------------------------------------


@dataclass
class Proc:
    name: str
    kind: str
    popen: subprocess.Popen[bytes]
    log: Path
    armed: str | None = None
    supervised: bool = True
    retired: bool = False
    """Sent SIGTERM by the scenario: a clean exit is expected."""

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class Fleet:
    """Relay and worker subprocesses configured like *settings*, kept running by a supervisor.

    Slots are supervised like pods: a slot whose process died is refilled after a short
    pause. Every exit other than our own SIGKILL (or a clean exit while stopping) is
    recorded in :attr:`unexpected`, with the tail of its log, and fails the scenario.
    """

    def __init__(self, settings: Settings, logdir: Path, *, app: str = APP, **env: str) -> None:
        """*app* is the workers' router; *env* their extra settings."""
        self.settings = settings
        self.app = app
        self.logdir = logdir
        self.env = {
            "POSTROOM_LOG_FORMAT": "json",
            "POSTROOM_LOG_LEVEL": "DEBUG",  # message.handled is DEBUG
            "POSTROOM_SHUTDOWN_TIMEOUT": "5",
            "POSTROOM_HEALTH_PORT": "0",
            **env,
        }
        self.procs: list[Proc] = []
        self.slots: dict[str, Proc] = {}
        self.unexpected: list[str] = []
        self.restarts = 0
        self._counter = 0
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._checked: set[int] = set()

    def spawn(self, kind: str, *, slot: str | None = None, armed: str | None = None) -> Proc:
        self._counter += 1
        name = f"{kind}-{self._counter}" + (f"-{armed}" if armed else "")
        log = self.logdir / f"{name}.log"
        args = ("relay",) if kind == "relay" else ("worker", self.app)
        extra = dict(self.env)
        if armed:
            extra["POSTROOM_CRASH_AT"] = armed
        with log.open("ab") as stderr:
            popen = subprocess.Popen(
                postroom_cmd(*args),
                env=settings_env(self.settings, **extra),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        proc = Proc(name, kind, popen, log, armed=armed, supervised=slot is not None)
        self.procs.append(proc)
        if slot is not None:
            self.slots[slot] = proc
        return proc

    def start(self, relays: int, workers: int) -> None:
        for i in range(relays):
            self.spawn("relay", slot=f"relay{i}")
        for i in range(workers):
            self.spawn("worker", slot=f"worker{i}")
        self._supervisor = asyncio.create_task(self._supervise())

    def live(self, kind: str) -> list[Proc]:
        return [p for p in self.slots.values() if p.kind == kind and p.alive]

    def kill(self, proc: Proc) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(signal.SIGKILL)

    def retire(self, proc: Proc) -> None:
        """Ask *proc* to stop gracefully (SIGTERM)."""
        proc.retired = True
        with contextlib.suppress(ProcessLookupError):
            proc.popen.terminate()

    async def wait_log(self, proc: Proc, marker: bytes, timeout: float) -> bool:
        """Wait until *proc*'s log contains *marker* (e.g. it connected); False if it died."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while proc.alive and loop.time() < deadline:
            if marker in proc.log.read_bytes():
                return True
            await asyncio.sleep(0.1)
        return False

    def _check_exit(self, proc: Proc) -> None:
        if id(proc) in self._checked:
            return
        self._checked.add(id(proc))
        code = proc.popen.returncode
        if code == -signal.SIGKILL or ((self._stopping or proc.retired) and code == 0):
            return
        asked = self._stopping or proc.retired  # we sent this process SIGTERM
        if asked and code == -signal.SIGTERM and not _logged_anything(proc.log):
            # Started just before we asked it to stop: still importing (~0.3 s quiet,
            # seconds at load 15: the 100k run retired an armed worker so), before postroom
            # installs any handler, so SIGTERM's default action ended it. Nothing to drain.
            return
        self.unexpected.append(f"{proc.name} exited {code}:\n{tail(proc.log)}")

    async def _supervise(self) -> None:
        while not self._stopping:
            for slot, proc in list(self.slots.items()):
                # A dead process still in its slot is replaced, whether or not its exit was
                # already checked below (keying the restart on "not checked yet" lost a
                # slot for good when it died between the two loops: found by the 100k run).
                if proc.popen.poll() is not None:
                    self._check_exit(proc)
                    await asyncio.sleep(0.2)
                    if not self._stopping:
                        self.restarts += 1
                        self.spawn(proc.kind, slot=slot)
            for proc in self.procs:
                if proc.popen.poll() is not None:
                    self._check_exit(proc)
            await asyncio.sleep(0.1)

    async def wait_dead(self, proc: Proc, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while proc.alive:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        """SIGTERM everything, wait for a graceful exit, SIGKILL stragglers."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for proc in self.procs:
            if proc.alive:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.terminate()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        for proc in self.procs:
            await self.wait_dead(proc, max(0.0, deadline - loop.time()))
            if proc.alive:
                self.unexpected.append(f"{proc.name} ignored SIGTERM for 20s:\n{tail(proc.log)}")
                proc.popen.kill()
                proc.popen.wait(timeout=10)
            elif proc.popen.returncode not in (0, -signal.SIGKILL):
                self._check_exit(proc)

    def deliveries(self) -> dict[str, Counter[str]]:
        """Deliveries per consumer and message id, from the workers' `message.handled` logs."""
        counts: dict[str, Counter[str]] = {name: Counter() for name in CONSUMERS}
        for proc in self.procs:
            if proc.kind != "worker":
                continue
            for line in proc.log.read_bytes().splitlines():
                if b"message.handled" not in line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                consumer = entry.get("consumer")
                if consumer in counts and entry.get("message_id"):
                    counts[consumer][entry["message_id"]] += 1
        return counts


def _logged_anything(path: Path) -> bool:
    try:
        return bool(path.read_bytes().strip())
    except OSError:
        return False


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- faults -----------------------------------------------------------------------------------


@dataclass
class Chaos:
    """What a fault can act on, and the tally of what it did."""

    rng: random.Random
    fleet: Fleet
    amqp_url: str
    """The test vhost's URL on the broker the fleet uses (for close_all_connections)."""
    admin_dsn: str
    """A superuser DSN to the run's database (for pg_terminate_backend)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Scenario-specific handles: proxies, private servers."""
    injected: Counter[str] = field(default_factory=Counter)
    """Faults done, by the kind each fault notes (one fault may note several)."""
    scheduled: Counter[str] = field(default_factory=Counter)
    """Faults run, by fault function."""
    effective: Counter[str] = field(default_factory=Counter)
    """Faults that noted at least one injection, by fault function (a kill finds no live
    process, an armed process never reaches its point: scheduled but not effective)."""
    log: list[str] = field(default_factory=list)

    def note(self, kind: str, detail: str = "") -> None:
        self.injected[kind] += 1
        self.log.append(f"{time.strftime('%H:%M:%S')} {kind} {detail}".rstrip())


Fault = Callable[[Chaos], Awaitable[None]]


async def inject(
    chaos: Chaos,
    faults: Sequence[Fault],
    until: Callable[[], bool],
    gap: tuple[float, float],
    *,
    rounds: int = 1,
) -> None:
    """Inject faults a random gap apart, in rounds, until *until()* and *rounds* rounds.

    Each round injects every fault once, in an order the seed shuffles: the seed decides
    the order and the timing, never whether a kind appears, so a run of *rounds* rounds
    injects each kind at least *rounds* times. Rounds go on while the workload runs.
    """
    done_rounds = 0
    while not (until() and done_rounds >= rounds):
        deck = list(faults)
        chaos.rng.shuffle(deck)
        for fault in deck:
            await asyncio.sleep(chaos.rng.uniform(*gap))
            name = getattr(fault, "__name__", repr(fault))
            before = sum(chaos.injected.values())
            await fault(chaos)
            chaos.scheduled[name] += 1
            if sum(chaos.injected.values()) > before:
                chaos.effective[name] += 1
        done_rounds += 1


# -- drain, history, figures --------------------------------------------------------------------


async def _observed(conn: asyncpg.Connection[Any], schema: str) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {name: set() for name in CONSUMERS}
    effects = qualified(schema, "fault_effects")
    dead = qualified(schema, "dead_letters")
    rows = await conn.fetch(
        f"SELECT DISTINCT consumer, message_id::text AS m FROM {effects} "
        f"UNION SELECT DISTINCT consumer, message_id AS m FROM {dead}"
    )
    for row in rows:
        seen.setdefault(row["consumer"], set()).add(row["m"])
    return seen


async def drain(dsn: str, schema: str, ledger: Ledger, *, timeout: float) -> float:
    """Wait until the outbox is empty and every consumer covered every committed message.

    This is the liveness invariant: after the faults heal the backlog drains within
    *timeout* seconds, or the scenario fails naming what is left. Returns the seconds taken.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    expected = set(ledger.committed) | set(ledger.foreign)
    outbox = qualified(schema, "outbox")
    last = ""
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                left = await conn.fetchval(f"SELECT count(*) FROM {outbox}")
                seen = await _observed(conn, schema)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            last = f"database unreachable: {exc}"
        else:
            missing = {name: expected - seen.get(name, set()) for name in CONSUMERS}
            if left == 0 and not any(missing.values()):
                return loop.time() - started
            last = f"outbox rows left: {left}; missing per consumer: " + ", ".join(
                f"{name}={len(ids)} (e.g. {sorted(ids)[:3]})" for name, ids in missing.items()
            )
        if loop.time() - started > timeout:
            raise AssertionError(f"liveness: the backlog did not drain within {timeout}s: {last}")
        await asyncio.sleep(0.5)


async def read_history(
    dsn: str, schema: str, deliveries: dict[str, Counter[str]] | None = None
) -> list[ConsumerHistory]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        effects = await conn.fetch(
            "SELECT consumer, message_id::text AS m, key, seq "
            f"FROM {qualified(schema, 'fault_effects')} ORDER BY key NULLS FIRST, position, id"
        )
        dead = await conn.fetch(
            f"SELECT consumer, message_id FROM {qualified(schema, 'dead_letters')} ORDER BY id"
        )
    finally:
        await conn.close()
    return [
        ConsumerHistory(
            name=name,
            effects=[(r["m"], r["key"], r["seq"]) for r in effects if r["consumer"] == name],
            dead_letters=[r["message_id"] for r in dead if r["consumer"] == name],
            ordered=name in ORDERED,
            deliveries=(deliveries or {}).get(name),
        )
        for name in CONSUMERS
    ]


@dataclass
class Figures:
    """One scenario's numbers, as printed and as reported in docs/guarantees.md."""

    scenario: str
    seed: int
    seconds: float
    drain_seconds: float
    faults: Counter[str]
    report: HistoryReport
    writer_errors: Counter[str]
    restarts: int
    scheduled: Counter[str] = field(default_factory=Counter)
    """Faults run, by fault function (see :attr:`Chaos.scheduled`)."""
    effective: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        total = self.report.total
        faults = ", ".join(f"{k}={v}" for k, v in sorted(self.faults.items())) or "none"
        return (
            f"scenario {self.scenario} seed={self.seed} in {self.seconds:.1f}s "
            f"(drained in {self.drain_seconds:.1f}s after healing)\n"
            f"faults injected: {sum(self.faults.values())} ({faults}); "
            f"process restarts: {self.restarts}\n"
            f"messages committed: {self.report.committed} "
            f"(rolled back {self.report.rolled_back}, indeterminate {self.report.indeterminate}, "
            f"of which committed {self.report.indeterminate_committed}); "
            f"writer errors: {dict(self.writer_errors) or 'none'}\n"
            f"lost={total.lost} phantom={total.phantom} applied_twice={total.applied_twice} "
            f"delivered_twice={total.delivered_twice} dead_letters={total.dead}\n"
            "fault functions (effective/scheduled): "
            + ", ".join(f"{k}={self.effective[k]}/{v}" for k, v in sorted(self.scheduled.items()))
        )


def check(ledger: Ledger, histories: Iterable[ConsumerHistory]) -> HistoryReport:
    """Check the outbox's messages; raw foreign messages are checked by :func:`foreign`."""
    strange = set(ledger.foreign) | ledger.foreign_unsure
    own = [
        replace(
            h,
            effects=[e for e in h.effects if str(e[0]) not in strange],
            dead_letters=[d for d in h.dead_letters if str(d) not in strange],
        )
        for h in histories
    ]
    return check_history(
        ledger.committed, ledger.rolled_back, own, indeterminate=ledger.indeterminate
    )


def foreign(ledger: Ledger, histories: Iterable[ConsumerHistory]) -> list[str]:
    """What went wrong with the raw malformed/oversized messages: each must be one dead
    letter per consumer and never an effect. Empty when all is well."""
    problems = []
    for h in histories:
        dead = Counter(str(d) for d in h.dead_letters)
        applied = {str(e[0]) for e in h.effects}
        for message_id, what in ledger.foreign.items():
            if dead[message_id] != 1 or message_id in applied:
                problems.append(
                    f"{h.name}: {what} {message_id} dead {dead[message_id]}x, "
                    f"applied {message_id in applied}"
                )
    return problems


def via(url: str, proxy: Any) -> str:
    """*url* with its host and port replaced by those of *proxy* (a FaultProxy)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}{proxy.host}:{proxy.port}"))
