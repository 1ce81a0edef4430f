"""Server-side faults: broker and database admin commands, and private throwaway servers.

Everything here is aimed at *this test run's* resources only: ``close_all_connections``
always names the run's vhost, ``pg_terminate_backend`` only touches postroom's backends in
the run's database, and full restarts or resource alarms happen on private RabbitMQ nodes
and PostgreSQL clusters started in a temporary directory, never on the shared services.

Commands run as asyncio subprocesses so an in-process :class:`FaultProxy` keeps forwarding
while they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import asyncpg

PG_BIN = Path("/usr/lib/postgresql/15/bin")
POSTROOM_APPS = ("postroom-relay", "postroom-worker")


class CommandFailed(AssertionError):
    """An admin command exited non-zero; the message carries its output."""


async def run(*argv: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run *argv* without blocking the event loop; return stdout, raise on failure."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise CommandFailed(
            f"{argv[0]} {' '.join(argv[1:3])}... timed out after {timeout}s"
        ) from None
    if check and process.returncode != 0:
        raise CommandFailed(
            f"{' '.join(argv)} exited {process.returncode}: {err.decode()[-500:]}{out.decode()[-300:]}"
        )
    return out.decode()


def rabbitmqctl() -> str:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise AssertionError("rabbitmqctl not found: broker faults need it")
    return exe


def vhost_of(amqp_url: str) -> str:
    vhost = amqp_url.rsplit("/", 1)[1]
    if not vhost or vhost == "%2F":
        # Never close every connection of the shared default vhost.
        raise AssertionError(f"refusing broker faults on the default vhost ({amqp_url})")
    return vhost


async def close_broker_connections(amqp_url: str, *, node: str | None = None) -> None:
    """Close every client connection of the test's vhost (and only of that vhost)."""
    node_args = ["-n", node] if node else []
    await run(
        rabbitmqctl(),
        *node_args,
        "close_all_connections",
        "-p",
        vhost_of(amqp_url),
        "postroom fault test",
    )


async def terminate_backends(admin_dsn: str) -> int:
    """pg_terminate_backend postroom's relay and worker backends in *admin_dsn*'s database."""
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        killed: int = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = ANY($1::text[]) "
            "AND pid <> pg_backend_pid()",
            list(POSTROOM_APPS),
        )
        return killed
    finally:
        await conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_port(port: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise AssertionError(
                    f"nothing listens on 127.0.0.1:{port} after {timeout}s"
                ) from None
            await asyncio.sleep(0.2)
            continue
        writer.close()
        return


class PrivateRabbit:
    """A throwaway RabbitMQ node on free ports, data in a temp dir; stop/start at will.

    Runs as the ``rabbitmq`` user (which owns the Erlang cookie the CLI uses), with its own
    node name, config, empty plugin list, Mnesia and log dirs, so it shares nothing with the
    machine's broker but epmd.
    """

    def __init__(self) -> None:
        self.node = f"postroom-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="postroom-rabbit-"))
        shutil.chown(self.dir, "rabbitmq")
        self.dir.chmod(0o755)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        for name in ("enabled_plugins", "rabbitmq.conf"):
            shutil.chown(self.dir / name, "rabbitmq")
        self.running = False

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> list[str]:
        return [
            "HOME=/var/lib/rabbitmq",
            f"RABBITMQ_NODENAME={self.node}",
            f"RABBITMQ_NODE_PORT={self.port}",
            f"RABBITMQ_DIST_PORT={self.dist_port}",
            f"RABBITMQ_MNESIA_BASE={self.dir / 'mnesia'}",
            f"RABBITMQ_LOG_BASE={self.dir / 'log'}",
            f"RABBITMQ_ENABLED_PLUGINS_FILE={self.dir / 'enabled_plugins'}",
            f"RABBITMQ_CONFIG_FILE={self.dir / 'rabbitmq'}",
            f"RABBITMQ_PID_FILE={self.dir / 'pid'}",
        ]

    async def start(self, timeout: float = 90.0) -> None:
        await run(
            "runuser",
            "-u",
            "rabbitmq",
            "--",
            "env",
            *self._env(),
            "/usr/lib/rabbitmq/bin/rabbitmq-server",
            "-detached",
        )
        self.running = True
        await wait_port(self.port, timeout)
        await self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)

    async def stop(self) -> None:
        """Stop the node (a clean broker shutdown: queues and messages stay on disk)."""
        if self.running:
            await self.ctl("stop", timeout=60)
            self.running = False

    async def ctl(self, *args: str, timeout: float = 60.0) -> str:
        return await run(rabbitmqctl(), "-n", self.node, *args, timeout=timeout)

    async def add_vhost(self, vhost: str) -> str:
        await self.ctl("add_vhost", vhost)
        await self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return self.url.rstrip("/") + "/" + vhost

    async def destroy(self) -> None:
        try:
            if self.running:
                with contextlib.suppress(Exception):
                    await self.stop()
            if self.running:  # the clean stop failed: kill the node's beam process
                pid = (self.dir / "pid").read_text().strip() if (self.dir / "pid").exists() else ""
                if pid.isdigit():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def memory_alarm(self) -> AsyncIterator[None]:
        """Raise a memory alarm (publishers block) for the block; always restore it."""
        before = await self.ctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
        previous = before.strip()
        try:
            float(previous)
        except ValueError:
            previous = "0.4"  # an absolute limit or an odd answer: restore the default
        await self.ctl("set_vm_memory_high_watermark", "0.0000001")
        try:
            yield
        finally:
            await self.ctl("set_vm_memory_high_watermark", previous)


class PrivatePostgres:
    """A throwaway PostgreSQL 15 cluster on a free port, data in a temp dir.

    Runs as the ``postgres`` user; ``crash()`` is ``pg_ctl stop -m immediate`` (no
    checkpoint: recovery replays the WAL at the next start), the closest thing to a
    power cut that leaves the machine's own cluster alone.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="postroom-pg-"))
        shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        self.running = False

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def _pg(self, tool: str, *args: str, timeout: float = 60.0) -> str:
        return await run(
            "runuser", "-u", "postgres", "--", str(PG_BIN / tool), *args, timeout=timeout
        )

    async def init(self) -> None:
        await self._pg(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )
        await self.start()

    async def start(self) -> None:
        options = f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        await self._pg(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )
        self.running = True

    async def crash(self) -> None:
        await self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.running = False

    async def destroy(self) -> None:
        try:
            if self.running or (self.data / "postmaster.pid").exists():
                with contextlib.suppress(Exception):
                    await self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
            self.running = False
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


async def amqp_ready(url: str, timeout: float = 30.0) -> None:
    """Wait until *url* accepts an AMQP connection."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            connection = await aio_pika.connect(url, timeout=5)
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.3)
            continue
        await connection.close()
        return
