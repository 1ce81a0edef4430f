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


class ThrowawayCA:
    """A certificate authority made for one test with the openssl CLI, in a temp dir.

    ``issue`` signs a server certificate for the given DNS names and IP addresses; the
    files are PEM, the keys unencrypted EC P-256 (fast to make).
    """

    def __init__(self, name: str = "postroom-test-ca") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="postroom-ca-"))
        self.dir.chmod(0o755)
        self.name = name
        self.cert = self.dir / "ca.crt"
        self.key = self.dir / "ca.key"

    async def create(self) -> ThrowawayCA:
        await run(
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(self.key), "-out", str(self.cert), "-days", "2",
            "-subj", f"/CN={self.name}",
        )  # fmt: skip
        return self

    async def issue(
        self, name: str, *, dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ()
    ) -> tuple[Path, Path]:
        """Return (certificate, key) files for a server known by *dns* and *ips*."""
        key, csr, cert = (self.dir / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        names = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        extensions = self.dir / f"{name}.ext"
        extensions.write_text(f"subjectAltName={','.join(names)}\n")
        await run(
            "openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={dns[0] if dns else name}",
        )  # fmt: skip
        await run(
            "openssl", "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey",
            str(self.key), "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile",
            str(extensions),
        )  # fmt: skip
        return cert, key

    def destroy(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbit:
    """A throwaway RabbitMQ node on free ports, data in a temp dir; stop/start at will.

    Runs as the ``rabbitmq`` user (which owns the Erlang cookie the CLI uses), with its own
    node name, config, empty plugin list, Mnesia and log dirs, so it shares nothing with the
    machine's broker but epmd. With *tls* (CA, certificate, key files) it listens for
    AMQPS only: a plain AMQP client finds no plain listener.
    """

    def __init__(
        self,
        tls: tuple[Path, Path, Path] | None = None,
        *,
        name: str | None = None,
        cookie: str | None = None,
        conf: str = "",
    ) -> None:
        """*name*, *cookie* and extra *conf* lines are for cluster nodes (see
        :mod:`tests.faults.cluster`): a private Erlang cookie, a partition handling mode."""
        self.node = f"{name or 'postroom-test-' + uuid.uuid4().hex[:8]}@localhost"
        self.cookie = cookie
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="postroom-rabbit-"))
        shutil.chown(self.dir, "rabbitmq")
        self.dir.chmod(0o755)
        self.tls = tls
        (self.dir / "enabled_plugins").write_text("[].\n")
        config = f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        if tls is not None:
            ca, cert, key = (self._own(path) for path in tls)
            config = (
                "listeners.tcp = none\n"
                f"listeners.ssl.default = 127.0.0.1:{self.port}\n"
                f"ssl_options.cacertfile = {ca}\nssl_options.certfile = {cert}\n"
                f"ssl_options.keyfile = {key}\nssl_options.verify = verify_none\n"
                "ssl_options.fail_if_no_peer_cert = false\nloopback_users = none\n"
            )
        (self.dir / "rabbitmq.conf").write_text(config + conf)
        for file in ("enabled_plugins", "rabbitmq.conf"):
            shutil.chown(self.dir / file, "rabbitmq")
        if cookie is not None:
            (self.dir / ".erlang.cookie").write_text(cookie)
            shutil.chown(self.dir / ".erlang.cookie", "rabbitmq")
            (self.dir / ".erlang.cookie").chmod(0o400)
        self.running = False

    def _own(self, source: Path) -> Path:
        target = self.dir / f"tls-{source.name}"
        shutil.copyfile(source, target)
        shutil.chown(target, "rabbitmq")
        target.chmod(0o600)
        return target

    @property
    def url(self) -> str:
        scheme = "amqps" if self.tls is not None else "amqp"
        return f"{scheme}://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> list[str]:
        private = self.cookie is not None
        return [
            f"HOME={self.dir if private else '/var/lib/rabbitmq'}",
            # Cluster nodes: one scheduler, no busy waiting (three VMs share two cores).
            *(
                [
                    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none"
                ]
                if private
                else []
            ),
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
        cookie = ["--erlang-cookie", self.cookie] if self.cookie else []
        return await run(rabbitmqctl(), *cookie, "-n", self.node, *args, timeout=timeout)

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
    power cut that leaves the machine's own cluster alone. With *tls* (certificate and key
    files) it runs ``ssl=on`` and accepts TCP clients over TLS only (``hostssl``), and
    with *password* they must log in with it (SCRAM); the Unix socket stays ``trust``.
    """

    def __init__(
        self, *, tls: tuple[Path, Path] | None = None, password: str | None = None
    ) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="postroom-pg-"))
        shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        self.running = False
        self.tls = tls
        self.password = password
        self.socket_dir = "/tmp"

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
        if self.tls is not None:
            method = "scram-sha-256" if self.password else "trust"
            hba = self.data / "pg_hba.conf"
            hba.write_text(f"local all all trust\nhostssl all all 127.0.0.1/32 {method}\n")
            for source, name in zip(self.tls, ("server.crt", "server.key"), strict=True):
                target = self.data / name
                shutil.copyfile(source, target)
                shutil.chown(target, "postgres")
                target.chmod(0o600)
        await self.start()
        if self.password is not None:
            conn = await asyncpg.connect(
                host=self.socket_dir, port=self.port, user="postgres", timeout=10
            )
            try:
                await conn.execute(f"ALTER USER postgres PASSWORD '{self.password}'")
            finally:
                await conn.close()

    async def start(self) -> None:
        options = f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        if self.tls is not None:
            options += " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
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
