"""A private database and vhost per run, settings for them, and CPU accounting."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from postroom.migrate import upgrade
from postroom.settings import Settings

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_ROOT = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
EXCHANGE = "bench.events"
QUEUE = "bench.sink"
TOPIC = "bench.order-placed"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class BenchEnv:
    """Where this run's services live: one database, one vhost, both private to it."""

    token: str
    database: str
    database_url: str  # postgresql+asyncpg:// form, for Settings and SQLAlchemy
    vhost: str
    amqp_url: str
    event_loop: str = "uvloop"  # for every process of the run, baselines included

    @property
    def dsn(self) -> str:
        """The database URL in asyncpg's own form."""
        return self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "database_url": self.database_url,
            "amqp_url": self.amqp_url,
            "exchange": EXCHANGE,
            "health_port": 0,
            "log_level": "WARNING",
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def postroom_env(self, **extra: str) -> dict[str, str]:
        """The environment for a ``python -m postroom`` subprocess aimed at this run.

        Every inherited ``POSTROOM_*`` variable is dropped: postroom rejects unknown
        ones, and a stray one from the caller's shell must not change the figures.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        env.update(
            POSTROOM_DATABASE_URL=self.database_url,
            POSTROOM_AMQP_URL=self.amqp_url,
            POSTROOM_EXCHANGE=EXCHANGE,
            POSTROOM_HEALTH_PORT="0",
            POSTROOM_LOG_FORMAT="json",
            POSTROOM_LOG_LEVEL="INFO",
            POSTROOM_EVENT_LOOP=self.event_loop,
        )
        env.update(extra)
        return env


def _rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=120)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def private_services(event_loop: str = "uvloop") -> Iterator[BenchEnv]:
    """Create this run's database (migrated to head) and vhost; drop both afterwards."""
    token = uuid.uuid4().hex[:10]
    database = f"postroom_bench_{token}"
    vhost = f"postroom-bench-{token}"
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    env = BenchEnv(
        token=token,
        database=database,
        database_url=f"{base}/{database}",
        vhost=vhost,
        amqp_url=AMQP_ROOT.rstrip("/") + "/" + vhost,
        event_loop=event_loop,
    )
    asyncio.run(_admin(f'CREATE DATABASE "{database}"'))
    try:
        _rabbitmqctl("add_vhost", vhost)
        try:
            _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            upgrade(env.settings())
            yield env
        finally:
            _rabbitmqctl("delete_vhost", vhost)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


# --- CPU accounting -----------------------------------------------------------------

_PG_AUXILIARY = (
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum launcher",
    "logical replication launcher",
    "stats collector",
    "archiver",
)


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of *pid* in seconds, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _processes() -> Iterator[tuple[int, str, str]]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            comm = Path(entry.path, "comm").read_text().strip()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        yield int(entry.name), comm, cmdline


@dataclass
class CpuSnapshot:
    """CPU seconds per process, grouped as client, broker and database."""

    groups: dict[str, dict[int, float]] = field(default_factory=dict)


@dataclass
class CpuMeter:
    """Sample /proc for the processes a phase involves.

    * client: the pids given (this process and the relays, load generators, workers);
    * broker: every ``beam.smp`` (shared with other users of the broker: noise);
    * postgres: the backends of this run's database plus the shared auxiliary
      processes (WAL writer, checkpointer, ...). Backends of other databases are left
      out. A process that exits mid-phase loses its share, so phases take the "after"
      sample while their connections and subprocesses are still alive.
    """

    database: str

    def snapshot(self, client_pids: Iterable[int] = ()) -> CpuSnapshot:
        clients = {os.getpid(), *client_pids}
        groups: dict[str, dict[int, float]] = {"client": {}, "broker": {}, "postgres": {}}
        for pid, comm, cmdline in _processes():
            group = None
            if pid in clients:
                group = "client"
            elif comm == "beam.smp":
                group = "broker"
            elif comm == "postgres" and (
                f" {self.database} " in cmdline or any(a in cmdline for a in _PG_AUXILIARY)
            ):
                group = "postgres"
            if group is None:
                continue
            seconds = _cpu_seconds(pid)
            if seconds is not None:
                groups[group][pid] = seconds
        return CpuSnapshot(groups)


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds each group spent between two snapshots (new processes count whole)."""
    spent: dict[str, float] = {}
    for group, pids in after.groups.items():
        old = before.groups.get(group, {})
        spent[group] = round(sum(t - old.get(pid, 0.0) for pid, t in pids.items()), 3)
    spent["total"] = round(sum(spent.values()), 3)
    return spent


def per_thousand(cpu: Mapping[str, float], messages: int) -> dict[str, float]:
    """CPU-seconds per 1000 messages, per group."""
    if messages <= 0:
        return {}
    return {group: round(seconds * 1000 / messages, 4) for group, seconds in cpu.items()}
